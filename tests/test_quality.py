"""The quality table (sgflow.quality, benchmarks/quality.py) end to end at a tiny size.

Two runs on ring8 with one seed: every method for a few steps (the structure of the JSON, the Markdown
table and the figure), and flow matching alone for 1000 steps (trained must beat untrained: catches a
sampler, metric or training loop that no longer learns). About 15 s on one CPU thread.
"""
import json
import math

import pytest
import torch

from sgflow.quality import METHODS, QualityConfig, config_from_args, preset, run_quality, samplers_for


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every method, 40 steps, ring8, seed 0, 256 evaluation samples."""
    out = tmp_path_factory.mktemp("quality")
    results = run_quality(preset("smoke"), out, log=lambda s: None, command="pytest smoke")
    return out, results


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_outputs_exist_and_json_round_trips(smoke):
    out, results = smoke
    for name in ("quality.json", "quality.md", "quality.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "quality.json").read_text())
    assert saved["config"]["datasets"] == ["ring8"] and saved["config"]["seeds"] == [0]
    assert set(saved["summary"]) == {"ring8"} and saved["wall_time_s"] > 0
    assert saved["machine"]["torch_threads"] == 1


def test_every_method_sampler_and_nfe_is_scored_with_finite_numbers(smoke):
    _, results = smoke
    nfe = QualityConfig().nfe
    assert {r["method"] for r in results["runs"]} == set(QualityConfig().methods)
    for ev in results["evals"]:
        samplers = ("euler",) if ev["method"] == "untrained" else samplers_for(ev["method"])
        got = {(r["sampler"], r["nfe"]) for r in ev["rows"]}
        want = {(s, k) for s in samplers for k in nfe if s != "heun" or k % 2 == 0}
        assert got == want, ev["method"]
        for r in ev["rows"]:
            assert _finite(r["map_mse"]) and r["map_mse"] >= 0 and _finite(r["energy"]), (ev["method"], r)
        assert _finite(ev["floor"]) and abs(ev["floor"]) < 0.05
    # Flow-map jumps also report the single-jump errors at fixed (t, u) pairs.
    sg = next(e for e in results["evals"] if e["method"] == "sgflow")
    assert sg["pairs"] and all(_finite(p["mse"]) for p in sg["pairs"])
    fm = next(e for e in results["evals"] if e["method"] == "flow_matching")
    assert not any(r["sampler"] == "flow_map" for r in fm["rows"])


def test_summary_cost_and_verdicts(smoke):
    _, results = smoke
    sd = results["summary"]["ring8"]
    for key, cost in sd["cost"].items():
        assert cost["step_ms"] > 0 and cost["peak_bytes"] > 0, key
        assert cost["diverged_seeds"] == []
    assert sd["cost"]["flow_matching"]["step_ms_x_fm"] == pytest.approx(1.0)
    # SGFlow's step keeps two JVPs' worth of activations; flow matching one forward's.
    assert sd["cost"]["sgflow"]["peak_bytes_x_fm"] > 1.0
    assert sd["cost"]["sgflow"]["training_method"] in ("sgflow_fused", "sgflow")
    row = next(r for r in sd["rows"] if (r["method"], r["sampler"], r["metric"], r["nfe"]) == ("sgflow", "flow_map", "energy", 1))
    assert row["values"] and row["std"] == 0.0 and row["mean"] == row["values"][0]
    assert {(v["metric"], v["nfe"]) for v in results["verdicts"]} == {(m, k) for m in ("map_mse", "energy") for k in (1, 2)}


def test_markdown_has_a_row_per_method_and_sampler(smoke):
    out, _ = smoke
    md = (out / "quality.md").read_text()
    assert "Command: `pytest smoke`" in md and "nothing was searched" in md
    for label in (METHODS[k][0] for k in QualityConfig().methods):
        assert f"| {label} | Euler |" in md and f"| {label} | Heun |" in md
        if label != "flow matching":
            assert f"| {label} | jumps |" in md
    assert "| flow matching | jumps |" not in md
    assert "## Cost per training step" in md and "## SGFlow at few steps" in md


def test_trained_flow_matching_beats_the_untrained_network(tmp_path):
    cfg = preset("smoke", methods=("flow_matching",), train_steps={"ring8": 1000}, n_eval=512, measure_memory=False)
    results = run_quality(cfg, tmp_path, log=lambda s: None)
    evals = {e["method"]: {(r["sampler"], r["nfe"]): r for r in e["rows"]} for e in results["evals"]}
    untrained = evals["untrained"][("euler", 16)]
    for sampler in ("euler", "heun"):
        trained = evals["flow_matching"][(sampler, 16)]
        # Measured: energy 0.014 vs 0.092 and map MSE 0.03 vs 0.26 (noise floor of the energy ~0.007 at n=512).
        assert trained["energy"] < 0.5 * untrained["energy"], (sampler, trained, untrained)
        assert trained["map_mse"] < 0.5 * untrained["map_mse"], (sampler, trained, untrained)


def test_options_and_their_errors():
    import argparse

    from sgflow.quality import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--quick", "--seeds", "3", "4", "--train-steps", "50"]))
    assert cfg.preset == "quick" and cfg.seeds == (3, 4) and cfg.train_steps == {"ring8": 50, "grid9": 50}
    cfg = config_from_args(p.parse_args(["--datasets", "gmm16"]))
    assert cfg.datasets == ("gmm16",) and cfg.train_steps["gmm16"] == QualityConfig().train_steps["gmm16"]
    assert cfg.diagonal_fraction == 0.5 and cfg.tune and not cfg.preset != "full"
    assert not config_from_args(p.parse_args(["--quick"])).tune and config_from_args(p.parse_args(["--quick", "--tune"])).tune
    cfg = config_from_args(p.parse_args(["--no-tune", "--diagonal-fraction", "0.75", "--jobs", "2"]))
    assert cfg.diagonal_fraction == 0.75 and not cfg.tune and cfg.jobs == 2
    for argv, msg in ((["--diagonal-fraction", "0.75"], "replaced by the tuned settings"),
                      (["--lr", "1e-3"], "--lr would be replaced"), (["--tune-seed", "1"], "also a reported seed"),
                      (["--jobs", "0"], "jobs must be"),(["--datasets", "cifar"], "unknown data set"), (["--methods", "ddpm"], "unknown method"),
                      (["--train-steps", "1"], ">= 2"), (["--seeds", "1", "1"], "distinct"),
                      (["--diagonal-fraction", "1"], "diagonal-fraction"), (["--diagonal-fraction", "0"], "diagonal-fraction")):
        with pytest.raises(ValueError, match=msg):
            config_from_args(p.parse_args(argv))


def test_cli_has_the_quality_subcommand(capsys):
    from sgflow.cli import main

    assert main(["quality", "--datasets", "nope"]) == 1
    assert "unknown data set 'nope'" in capsys.readouterr().err


def test_render_reproduces_the_report_from_the_json(smoke, tmp_path):
    import shutil

    from sgflow.quality import render

    out, _ = smoke
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "quality.md").unlink()
    (copy / "quality.png").unlink()
    render(copy)
    assert (copy / "quality.md").read_text() == (out / "quality.md").read_text()
    assert (copy / "quality.png").stat().st_size > 0


def test_a_diverged_seed_makes_the_mean_infinite_not_absent(smoke):
    from sgflow.quality import markdown, summarize
    from sgflow.quality.report import _clean

    out, _ = smoke
    saved = json.loads((out / "quality.json").read_text())
    ev = next(e for e in saved["evals"] if e["method"] == "sgflow")
    row = next(r for r in ev["rows"] if r["sampler"] == "flow_map" and r["nfe"] == 1)
    row["energy"] = None  # what the JSON stores for a non-finite value
    saved["summary"] = summarize(saved)
    s = next(r for r in saved["summary"]["ring8"]["rows"]
             if (r["method"], r["sampler"], r["metric"], r["nfe"]) == ("sgflow", "flow_map", "energy", 1))
    assert s["mean"] == math.inf
    saved["verdicts"] = []
    assert "| SGFlow | jumps | diverged |" in markdown(saved)
    # Read back from JSON, that infinite mean is a null: the report recomputes the summary instead of failing.
    saved["summary"] = json.loads(json.dumps(_clean(saved["summary"])))
    assert "| SGFlow | jumps | diverged |" in markdown(saved)


def test_figure_is_drawn_off_pyplot(smoke, tmp_path):
    """The figure is a matplotlib Figure on its own Agg canvas: no pyplot figure stays open and the backend
    of the calling process is not switched."""
    import matplotlib
    import matplotlib.pyplot as plt
    from PIL import Image

    from sgflow.quality import figure

    _, results = smoke
    backend = matplotlib.get_backend()
    path = figure(results, tmp_path / "sub" / "q.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        # figsize 5.2 ncol x 3.6 rows inches at 110 dpi: ring8 has two metrics in one row
        assert im.size == (round(5.2 * 2 * 110), round(3.6 * 110))
    assert plt.get_fignums() == [] and matplotlib.get_backend() == backend
