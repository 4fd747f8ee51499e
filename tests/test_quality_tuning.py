"""The quality table's equal tuning budget, its parallel runs and its distillation rows (sgflow.quality).

Tiny runs on ring8 (12 steps, 128 evaluation samples): what is checked is the bookkeeping (every method gets
the same trials on a seed that is never reported, the chosen trial is the one used, a distillation run trains
its teacher first, runs in worker processes give the same numbers as in this one), not quality.
"""
import dataclasses
import math

import pytest
import torch

from sgflow.quality import METHODS, markdown, preset, run_quality
from sgflow.quality.config import TUNING, tuning_trials
from sgflow.quality.runs import choose_settings, tuning_score


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_every_method_gets_the_same_number_of_trials_over_its_lr():
    counts = {k: len(tuning_trials(k)) for k in METHODS}
    assert set(counts.values()) == {6}, counts
    for k in METHODS:
        assert "lr" in TUNING[k] and len(TUNING[k]) == 2, k  # the learning rate and one knob of its own
        assert len({tuple(sorted(t.items())) for t in tuning_trials(k)}) == 6  # distinct trials
    with pytest.raises(ValueError, match="cannot tune \\['batch_size'\\]"):
        tuning_trials("sgflow", {"batch_size": (64, 128)})


@pytest.mark.parametrize("case", ["lowest", "tie_earliest", "all_diverged"])
def test_choose_settings(case):
    a, b = {"lr": 1e-3}, {"lr": 3e-3}
    scores = {"lowest": (0.5, 0.2), "tie_earliest": (0.3, 0.3), "all_diverged": (math.inf, math.inf)}[case]
    trials = [{"dataset": "ring8", "method": "sgflow", "index": i, "settings": s, "score": v}
              for i, (s, v) in enumerate(zip((a, b), scores))]
    want = {"lowest": b, "tie_earliest": a, "all_diverged": {}}[case]
    assert choose_settings(list(reversed(trials))) == {"ring8": {"sgflow": want}}


def test_tuning_score_takes_the_natural_sampler_and_is_infinite_when_a_value_is_missing():
    fm = {"method": "flow_matching", "rows": [{"sampler": "euler", "nfe": 1, "map_mse": 0.5},
                                               {"sampler": "euler", "nfe": 2, "map_mse": 0.4},
                                               {"sampler": "heun", "nfe": 2, "map_mse": 0.2}]}
    assert tuning_score(fm, "ring8") == pytest.approx((0.5 + 0.2) / 2)
    jumps = {"method": "sgflow", "rows": [{"sampler": "flow_map", "nfe": 1, "map_mse": 0.1},
                                          {"sampler": "flow_map", "nfe": 2, "map_mse": None}]}
    assert tuning_score(jumps, "ring8") == math.inf
    jumps["rows"][1]["map_mse"] = float("nan")
    assert tuning_score(jumps, "ring8") == math.inf
    jumps["rows"].pop()
    assert tuning_score(jumps, "ring8") == math.inf


def _tiny(**kw):
    return preset("smoke", train_steps={"ring8": 12}, nfe=(1, 2), n_eval=128, warmup=2, measure_memory=False, **kw)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    cfg = _tiny(tune=True, methods=("flow_matching", "sgflow", "distill", "meanflow_2x"))
    return cfg, run_quality(cfg, tmp_path_factory.mktemp("tuned"), log=lambda s: None)


def test_tuned_runs_use_the_chosen_trial_and_report_other_seeds(tuned):
    cfg, res = tuned
    tun = res["tuning"]
    assert tun["seed"] == cfg.tune_seed and cfg.tune_seed not in cfg.seeds
    assert len(tun["trials"]) == 6 * len(cfg.methods)
    assert {e["seed"] for e in res["evals"]} == set(cfg.seeds)  # the tuning seed is never reported
    for t in tun["trials"]:
        assert {r["nfe"] for r in t["rows"]} == set(cfg.tune_nfe)
        assert {r["sampler"] for r in t["rows"]} == ({"euler", "heun"} if t["method"] == "flow_matching" else {"flow_map"})
    for run in res["runs"]:
        mine = [t for t in tun["trials"] if t["method"] == run["method"]]
        best = min(mine, key=lambda t: (t["score"], t["index"]))
        assert run["settings"] == tun["chosen"]["ring8"][run["method"]] == best["settings"], run["method"]
    md = markdown(res)
    assert "## Tuning (equal budget)" in md and "nothing was searched" not in md


def test_distillation_trains_its_teacher_first_and_meanflow_2x_twice_the_steps(tuned):
    cfg, res = tuned
    runs = {r["method"]: r for r in res["runs"]}
    steps = cfg.train_steps["ring8"]
    assert runs["meanflow_2x"]["steps"] == 2 * steps and runs["distill"]["steps"] == steps
    teacher = runs["distill"]["teacher"]
    assert teacher["method"] == "flow_matching" and teacher["steps"] == steps
    assert teacher["settings"] == res["tuning"]["chosen"]["ring8"]["flow_matching"]  # the tuned teacher
    assert runs["distill"]["train_s"] > teacher["train_s"]
    subjects = {(v["subject"], v["nfe"]) for v in res["verdicts"]}
    assert {("sgflow", 1), ("distill", 1), ("distill", 2)} <= subjects
    distill = next(v for v in res["verdicts"] if v["subject"] == "distill")
    assert "vs_meanflow_2x" in distill and "vs_flow_matching" in distill


def test_worker_processes_give_the_same_numbers(tmp_path):
    cfg = _tiny(methods=("flow_matching", "sgflow"))
    one = run_quality(cfg, tmp_path / "one", log=lambda s: None)
    two = run_quality(dataclasses.replace(cfg, jobs=2), tmp_path / "two", log=lambda s: None)
    key = lambda e: (e["method"], e["seed"])  # noqa: E731
    assert sorted(map(key, one["evals"])) == sorted(map(key, two["evals"]))
    for a, b in zip(sorted(one["evals"], key=key), sorted(two["evals"], key=key)):
        assert a["rows"] == b["rows"], a["method"]
