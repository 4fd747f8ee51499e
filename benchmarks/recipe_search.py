"""The search behind SGFlow's training recipe (docs/quality.md, "SGFlow's training recipe").

Trains SGFlow variants with the quality table's settings (mlp-small, batch 256, lr 3e-3, 100 warm-up steps,
cosine, clip 1, EMA 0.995, 2000 steps) and prints one JSON line per seed: whether it diverged, and the 1- and
2-NFE flow-map MSE against the exact map (mixtures) or energy distance (other 2-D sets).

Variants that are library options run through ``sgflow.fused_loss`` (``--loss-opt``); the ones that were
tried and not kept are defined here, on the same dual forward:

- ``--variant guard --guard C``: the paper's split estimator with its second term scaled by
  sg[min(1, C term1 / term2)] (inactive at the solution, where the two terms are equal in expectation);
- ``--variant both``: both terms on every sample, the diagonal's constant second-term rows skipped;
- ``--variant semi --c C``: the semi update with the target r2 scaled by C (C < 1 leans towards Eulerian
  self-distillation); ``--oracle``: v_hat and the target from the mixture's exact velocity (mixtures only).

    python benchmarks/recipe_search.py --data gmm16 --variant guard --guard 2
    python benchmarks/recipe_search.py --data gmm32 --loss-opt update=semi --loss-opt target=ema
    python benchmarks/recipe_search.py --data gmm16 --method meanflow_fused
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import sgflow
from sgflow.cli import _parse_kv
from sgflow.losses.common import draw_batch, mean_sq
from sgflow.losses.fused import dual_jvp_of_f
from sgflow.losses.semi import semi_loss
from sgflow.quality import DATA_SPECS, evaluate_method, preset
from sgflow.train import TrainConfig, Trainer, TrainingDiverged

_EXACT = {}  # the current data set's mixture (for --oracle)


def search_loss(model, x1, *, interpolant="linear", time_sampler=None, noise=None, t=None, u=None, split=None,
                generator=None, variant="guard", guard=2.0, c=1.0, oracle=False):
    """The variants above. ``split`` [B] bool: the trainer's paired split (first-term rows)."""
    b = draw_batch(x1, interpolant=interpolant, time_sampler=time_sampler, noise=noise, t=t, u=u, generator=generator)
    diag = b.t == b.u
    with torch.no_grad():
        v_hat = _EXACT["mix"].velocity(b.t, b.xt).to(x1.dtype) if oracle else model(b.t, b.t, b.xt).detach()
    jvp_of_f = dual_jvp_of_f(model)
    if variant == "semi":
        # Target c J (Xdot - v_hat): Xdot moved to v_hat + c (Xdot - v_hat) (linear in it; the diagonal's too).
        b.xdot = v_hat + c * (b.xdot - v_hat)
        return semi_loss(jvp_of_f, b, v_hat)
    first = torch.ones_like(diag) if variant == "both" else split
    second = ~diag if variant == "both" else (~split) & (~diag)  # second-term rows on the diagonal are constant
    i1, i2 = first.nonzero().squeeze(1), second.nonzero().squeeze(1)
    idx = torch.cat([i1, i2])
    t_dot = torch.cat([torch.ones(len(i1)), torch.zeros(len(i2))]).to(x1.dtype)
    x_dot = torch.cat([b.xdot[i1], b.xdot[i2] - v_hat[i2]])
    per = mean_sq(jvp_of_f(b.t[idx], b.u[idx], b.xt[idx], t_dot, x_dot))
    const = (~first) & diag if variant != "both" else diag
    n2 = int((~first).sum()) if variant != "both" else x1.shape[0]
    term1 = per[:len(i1)].mean()
    term2 = (per[len(i1):].sum() + mean_sq(b.xdot[const] - v_hat[const]).sum()) / max(n2, 1)
    ratio = (term2 / term1).detach()
    scale = torch.clamp(guard / ratio, max=1.0) if variant == "guard" else 1.0
    loss = term1 - scale * term2
    return loss, {"loss": loss.detach(), "term1": term1.detach(), "term2": term2.detach(), "ratio": ratio}


sgflow.LOSSES["recipe_search"] = search_loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="gmm16", help=f"one of {', '.join(DATA_SPECS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--method", default=None, help="a training method (default: this script's variants)")
    p.add_argument("--variant", choices=("guard", "both", "semi"), default=None)
    p.add_argument("--guard", type=float, default=2.0)
    p.add_argument("--c", type=float, default=1.0)
    p.add_argument("--oracle", action="store_true")
    p.add_argument("--loss-opt", action="append", metavar="K=V", help="options of a library method's loss")
    p.add_argument("--diagonal-fraction", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = DATA_SPECS[a.data]
    if a.variant is not None:
        method, kw = "recipe_search", {"variant": a.variant, "guard": a.guard, "c": a.c, "oracle": a.oracle}
    else:
        method, kw = a.method or "sgflow_fused", (_parse_kv(a.loss_opt, "--loss-opt") if a.loss_opt else None)
    qcfg = preset("full", measure_memory=False, n_eval=1000, nfe=(1, 2), lr=a.lr)
    for seed in a.seeds:
        ds = spec.dataset()
        _EXACT["mix"] = getattr(ds, "mixture", None)
        tc = TrainConfig(method=method, data=spec.data, data_kwargs=dict(spec.data_kwargs), model=spec.model,
                         model_kwargs=dict(spec.model_kwargs), steps=a.steps, batch_size=a.batch_size or spec.batch_size,
                         lr=a.lr, warmup=qcfg.warmup, lr_schedule="cosine", ema_decay=qcfg.ema_decay, grad_clip=1.0,
                         seed=seed, diagonal_fraction=a.diagonal_fraction, out_dir=None, log_every=25, progress=False,
                         figures=False, loss_kwargs=kw)
        torch.manual_seed(seed)
        trainer = Trainer(tc, model=spec.build_network(ds.shape))
        t0, diverged = time.perf_counter(), None
        try:
            trainer.run()
        except TrainingDiverged:
            diverged = trainer.step
        ev = evaluate_method(trainer.ema.eval(), "sgflow", ds, qcfg, seed, {})
        head = "map_mse" if _EXACT["mix"] is not None else ("frechet" if ds.is_image else "energy")
        res = {f"{head}@{r['nfe']}": r.get(head) for r in ev["rows"] if r["sampler"] == "flow_map"}
        rec = {"data": a.data, "method": method, "loss_kwargs": tc.loss_kwargs, "diagonal_fraction": a.diagonal_fraction,
               "seed": seed, "diverged_at": diverged, **res, "max_ratio": max((h.get("ratio", 0) for h in trainer.history), default=None),
               "seconds": round(time.perf_counter() - t0, 1)}
        line = json.dumps(rec)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
