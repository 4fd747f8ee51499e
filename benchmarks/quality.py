"""The quality table (issue 12): every method on the same network, data, step budget and seeds, sampled
at 1, 2, 4, 8 and 16 network evaluations; JSON, Markdown table and figure under --out.

    python benchmarks/quality.py --quick                                  # ring8 + grid9, 2 seeds (~2-3 min, 2 CPU cores)
    python benchmarks/quality.py --out benchmarks/results/quality         # full: 4 data sets, 3 seeds
    sgflow quality --quick                                                # the same, from the command line

The logic lives in :mod:`sgflow.quality`; this script only parses the options.
"""
import argparse
import sys

from sgflow.quality import add_arguments, run_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    try:
        run_from_args(args, prog="python benchmarks/quality.py")
    except (ValueError, FileNotFoundError) as e:  # bad names, steps, seeds; --render without a JSON: one line
        print(f"quality.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
