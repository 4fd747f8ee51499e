"""``sgflow demo``: train SGFlow on a 2-D mixture, plot and score it (about a minute on a CPU)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from sgflow.cli.common import CLIError, _set_threads


# ---------------------------------------------------------------------- demo
# Chosen by sweeps on a 2-core CPU (see the report in the demo's docstring): a small MLP trained for
# many steps beats a wide one trained for few; both SGFlow terms on every sample (both_terms) cancel
# the conditional-velocity noise per sample and beat the split batch at equal cost; the time
# embedding's frequencies are lowered (time_scale) because the t-JVP differentiates them.
DEMO_DEFAULTS = dict(data="ring8", steps=4000, batch_size=256, lr=3e-3, warmup=100, ema_decay=0.995, model="mlp-small",
                     model_kwargs={"time_scale": 30.0}, loss_kwargs={"both_terms": True}, diagonal_fraction=0.5)


def _add_demo(sub):
    p = sub.add_parser("demo", help="1-minute CPU demo: train SGFlow on a 2-D mixture, plot and score it",
                       description="Train SGFlow (fused path if available) on a 2-D Gaussian mixture with an MLP, "
                       "write one PNG of samples at 1, 2, 4 and 8 steps beside the data, and print the energy "
                       "distance and exact flow-map error per step count, untrained vs trained.")
    p.add_argument("--out", default="sgflow-demo", help="output directory (default ./sgflow-demo)")
    p.add_argument("--data", default=DEMO_DEFAULTS["data"], choices=("ring8", "grid9"))
    p.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"], help=f"training steps (default {DEMO_DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, default=DEMO_DEFAULTS["batch_size"])
    p.add_argument("--method", default="auto", help="auto (sgflow_fused if available, else sgflow) or any training method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=2000, help="evaluation samples per step count")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: more help this small MLP "
                   "little on an idle CPU and slow it down many times on a busy one)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from sgflow.evaluate import evaluate, format_table
    from sgflow.plotting import auto_limit, samples_figure, save_png
    from sgflow.train import TrainConfig, Trainer, available_methods, generate

    t_start = time.perf_counter()
    _set_threads(args.threads)
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")
    method = args.method
    if method == "auto":
        method = "sgflow_fused" if "sgflow_fused" in available_methods() else "sgflow"
    out = Path(args.out)
    cfg = TrainConfig(
        method=method, data=args.data, model=DEMO_DEFAULTS["model"], model_kwargs=dict(DEMO_DEFAULTS["model_kwargs"]),
        steps=args.steps, batch_size=args.batch_size, lr=DEMO_DEFAULTS["lr"], warmup=DEMO_DEFAULTS["warmup"],
        lr_schedule="cosine", ema_decay=DEMO_DEFAULTS["ema_decay"], grad_clip=1.0, seed=args.seed, out_dir=str(out),
        log_every=50, figures=False, progress=not args.no_progress, device="cpu",
        loss_kwargs=dict(DEMO_DEFAULTS["loss_kwargs"]) if method.startswith("sgflow") else {},
        diagonal_fraction=DEMO_DEFAULTS["diagonal_fraction"],
    )
    steps_eval = (1, 2, 4, 8, 16)
    trainer = Trainer(cfg)
    try:
        import copy

        untrained = copy.deepcopy(trainer.model).eval()
        dataset = trainer.dataset
        cache = {}
        before = evaluate(untrained, dataset, steps_eval, n=args.n, seed=args.seed + 1, cache=cache)
        print(f"training {method} on {args.data} (MLP, batch {cfg.batch_size}, {cfg.steps} steps, "
              f"{torch.get_num_threads()} CPU thread(s)) ...", flush=True)
        t_train = time.perf_counter()
        trainer.run()
        train_time = time.perf_counter() - t_train
    finally:
        trainer.close()
    after = evaluate(trainer.ema, dataset, steps_eval, n=args.n, seed=args.seed + 1, cache=cache)

    g = torch.Generator().manual_seed(args.seed + 2)
    data = dataset.sample(args.n, generator=g)
    x0 = torch.randn((args.n, *dataset.shape), generator=g)
    shown = (1, 2, 4, 8)
    samples = generate(trainer.ema, x0, shown, "flow_map")
    ed = {r["steps"]: r["energy"] for r in after["rows"]}
    mse = {r["steps"]: r["map_mse"] for r in after["rows"]}
    footers = [f"ED floor {after['noise_floor']:.4f}"] + [f"ED {ed[k]:.4f}   map MSE {mse[k]:.4f}" for k in shown]
    fig = samples_figure(data, samples, title=f"SGFlow ({method}) on {args.data}: {cfg.steps} training steps, "
                         f"{train_time:.0f}s on CPU", footers=footers, lim=auto_limit(data) * 1.05)
    png = save_png(fig, out / "demo.png")
    print()
    print("Quality vs number of flow-map steps (ED: energy distance to fresh data; map MSE: error of the k-step map")
    print("against the exact flow map f(0,1,x) of the mixture, both lower is better):")
    print(format_table({"untrained": before, "trained": after}))
    print()
    print(f"figure: {png}   checkpoint: {out / 'checkpoint.pt'}")
    print(f"wall time: {time.perf_counter() - t_start:.1f}s (training {train_time:.1f}s)")
    return 0
