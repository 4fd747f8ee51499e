"""pytest-benchmark on CPU: after the run, print each group's medians as ratios to its reference.

    python -m pytest benchmarks/test_cpu_benchmarks.py --benchmark-json=benchmarks/results/cpu.json
"""
import collections

import pytest

MEDIANS = collections.defaultdict(dict)  # group -> {name: median seconds}
REFERENCE = {}  # group -> name of the reference implementation


@pytest.fixture
def record(benchmark):
    """``record(group, name, fn, reference=False)``: benchmark ``fn`` and remember its median."""

    def run(group, name, fn, reference=False):
        benchmark.group = group
        benchmark.name = name
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
        MEDIANS[group][name] = benchmark.stats.stats.median
        if reference:
            REFERENCE[group] = name

    return run


def pytest_terminal_summary(terminalreporter):
    if not MEDIANS:
        return
    tr = terminalreporter
    tr.write_sep("=", "medians and ratios to the reference of each group")
    for group, rows in MEDIANS.items():
        ref = rows.get(REFERENCE.get(group))
        for name, med in rows.items():
            ratio = f"{med / ref:6.2f}x" if ref else "   n/a"
            tr.write_line(f"{group:<28} {name:<22} {med * 1e3:9.1f} ms  {ratio} {REFERENCE.get(group, '')}")
