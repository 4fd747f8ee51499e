"""SGFlow distillation measured (issue 21): a flow-matching teacher, SGFlow distilled from it under each teacher
mode / schedule, SGFlow and MeanFlow from scratch, on the quality table's networks and optimiser settings.

    python benchmarks/distill.py --data ring8 gmm16 --seeds 0 1 2 --steps 500 --out benchmarks/results/distill

Per (data set, seed): the teacher is trained by flow matching for ``--steps`` steps (its checkpoint is what
``sgflow train --teacher`` reads); each distilled student gets ``--steps`` more (total compute: 2x steps, the
student's steps each cost one teacher forward more than SGFlow's); SGFlow from scratch gets ``--steps``;
MeanFlow from scratch gets 2x steps (the teacher's budget plus its own). Scores: flow-map MSE against the
exact map f(0, 1, x0) of the mixture and the energy distance, at 1, 2, 4 NFE (teacher: Euler, Heun).
Results are appended to OUT/runs.jsonl as they come; OUT/distill.md holds the table (means over seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sgflow.evaluate import evaluate_points
from sgflow.quality import _SMALL_MLP, DATA_SPECS, DataSpec, QualityConfig
from sgflow.train import TrainConfig, Trainer, TrainingDiverged

# name -> (method, loss_kwargs (None: the method's recipe), teacher mode, teacher schedule, steps multiplier, taught)
SEMI, PAPER = {"update": "semi"}, {}
VARIANTS = {
    "distil_semi": ("sgflow_fused", SEMI, "second", "constant", 1, True),
    "distil_paper_second": ("sgflow_fused", PAPER, "second", "constant", 1, True),
    "distil_paper_both": ("sgflow_fused", PAPER, "both", "constant", 1, True),
    "distil_semi_warm": ("sgflow_fused", SEMI, "second", "warm", 1, True),
    "distil_semi_linear": ("sgflow_fused", SEMI, "second", "linear", 1, True),
    "sgflow_semi": ("sgflow_fused", SEMI, "second", "constant", 1, False),
    "sgflow_paper": ("sgflow_fused", PAPER, "second", "constant", 1, False),
    "meanflow_2x": ("meanflow_fused", PAPER, "second", "constant", 2, False),
}
NFE = (1, 2, 4)
# The quality table's data sets plus the 32- and 64-D mixtures (the 16-D one's network and settings).
SPECS = dict(DATA_SPECS, **{f"gmm{d}": DataSpec(f"gmm{d}", "gmm", {"dim": d}, "mlp-small", _SMALL_MLP) for d in (32, 64)})


def config(spec, method, steps, seed, out_dir=None, **kw) -> TrainConfig:
    q = QualityConfig()
    return TrainConfig(method=method, data=spec.data, data_kwargs=dict(spec.data_kwargs), model=spec.model,
                       model_kwargs=dict(spec.model_kwargs), steps=steps, batch_size=spec.batch_size, lr=q.lr,
                       warmup=q.warmup, lr_schedule=q.lr_schedule, ema_decay=q.ema_decay, grad_clip=q.grad_clip,
                       seed=seed, diagonal_fraction=q.diagonal_fraction, out_dir=out_dir, log_every=25, progress=False,
                       figures=False, device="cpu", **kw)


def run_one(cfg: TrainConfig):
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    diverged = None
    try:
        trainer.run()
    except TrainingDiverged as e:
        diverged = str(e)
    finally:
        trainer.close()
    return trainer, diverged, time.perf_counter() - t0


def score(model, dataset, sampler, seed, n, cache):
    per = 2 if sampler == "heun" else 1
    nfe = [k for k in NFE if k % per == 0]
    res = evaluate_points(model, dataset, [k // per for k in nfe], n=n, seed=1000 + seed, sampler=sampler, pairs=(),
                          cache=cache, projections=4)
    return {int(k): {"map_mse": r["map_mse"], "energy": r["energy"]} for k, r in zip(nfe, res["rows"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=["ring8", "gmm16"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/distill")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    for data in args.data:
        spec = SPECS[data]
        dataset = spec.dataset()
        for seed in args.seeds:
            cache = {}
            tdir = out / f"teacher_{data}_s{seed}"
            tr, div, secs = run_one(config(spec, "flow_matching", args.steps, seed, out_dir=str(tdir), loss_kwargs={}))
            rec = {"data": data, "seed": seed, "run": "teacher_fm", "steps": args.steps, "diverged": div, "train_s": secs,
                   "euler": score(tr.ema, dataset, "euler", seed, args.n_eval, cache),
                   "heun": score(tr.ema, dataset, "heun", seed, args.n_eval, cache)}
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
            for name in args.variants:
                method, loss_kwargs, mode, schedule, mult, taught = VARIANTS[name]
                kw = dict(teacher=str(tdir), teacher_mode=mode, teacher_schedule=schedule) if taught else {}
                kw["loss_kwargs"] = dict(loss_kwargs)
                tr, div, secs = run_one(config(spec, method, mult * args.steps, seed, **kw))
                rec = {"data": data, "seed": seed, "run": name, "steps": mult * args.steps, "diverged": div,
                       "train_s": secs, "flow_map": score(tr.ema, dataset, "flow_map", seed, args.n_eval, cache)}
                with open(log, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
    (out / "distill.md").write_text(table(log))
    print(table(log))
    return 0


def table(log) -> str:
    """Markdown: flow-map MSE (energy distance) at 1, 2, 4 NFE, mean over seeds; diverged runs counted."""
    recs = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    rows, order = {}, []
    for r in recs:
        for sampler in ("euler", "heun", "flow_map"):
            if sampler not in r:
                continue
            key = (r["data"], r["run"] + ("" if sampler == "flow_map" else f" ({sampler})"))
            if key not in rows:
                rows[key] = {"seeds": 0, "diverged": 0, "steps": r["steps"], "vals": {}}
                order.append(key)
            row = rows[key]
            row["seeds"] += 1
            row["diverged"] += r["diverged"] is not None
            for k, v in r[sampler].items():
                row["vals"].setdefault(int(k), []).append(v)
    lines = ["| data | run | steps | seeds (diverged) | " + " | ".join(f"{k} NFE: MSE (ED)" for k in NFE) + " |",
             "|---|---|---|---|" + "---|" * len(NFE)]
    for key in order:
        row = rows[key]
        cells = []
        for k in NFE:
            vals = row["vals"].get(k)
            if not vals:
                cells.append("")
                continue
            mse = [v["map_mse"] for v in vals]
            ed = [v["energy"] for v in vals]
            fm = lambda xs: f"{statistics.mean(xs):.3g}" if all(math.isfinite(x) for x in xs) else "inf"  # noqa: E731
            cells.append(f"{fm(mse)} ({fm(ed)})")
        lines.append(f"| {key[0]} | {key[1]} | {row['steps']} | {row['seeds']} ({row['diverged']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
