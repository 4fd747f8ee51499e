"""ATen ops per training step as a first-class number (issue 18): sgflow.memory.OpCounter and the
``aten_ops`` column of benchmarks/memory.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from sgflow.memory import OpCounter, count_aten_ops


def test_op_counter_counts_every_dispatched_op_by_name():
    lin = torch.nn.Linear(3, 4)
    x = torch.randn(2, 3)
    with OpCounter() as c:
        y = torch.relu(lin(x)).sum()
    fwd = c.ops
    assert c.by_op["aten.addmm.default"] == 1 and c.by_op["aten.relu.default"] == 1 and c.by_op["aten.sum.default"] == 1
    got = count_aten_ops(lambda: y.backward())
    assert got["ops"] > 0 and got["by_op"]["aten.threshold_backward.default"] == 1  # autograd's backward too
    assert fwd == sum(c.by_op.values())


def test_memory_benchmark_reports_aten_ops_against_flow_matching_behind_a_wrapper(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_memory", Path(__file__).parents[1] / "benchmarks" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "mem"
    bench.main(["--device", "cpu", "--network", "dit", "--shape", "3,8,8", "--wrap", "--batch", "2", "--steps", "1",
                "--warmup", "0", "--methods", "flow_matching,sgflow_fused", "--op-breakdown", "3", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert data["meta"]["config"] == "wrapped dit"
    assert rows["flow_matching"]["aten_ops_ratio"] == 1.0
    assert rows["sgflow_fused"]["aten_ops"] > rows["flow_matching"]["aten_ops"] > 0
    assert len(rows["sgflow_fused"]["aten_ops_top"]) == 3
    assert "ATen ops" in capsys.readouterr().out
    assert "aten_ops_ratio" in out.with_suffix(".csv").read_text().splitlines()[0]
