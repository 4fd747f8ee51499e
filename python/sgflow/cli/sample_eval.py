"""``sgflow sample`` and ``sgflow eval``: the commands that read a checkpoint."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sgflow.cli.common import CLIError, _device, _positive_ints, _set_threads


# ---------------------------------------------------------------------- sample
def _add_sample(sub):
    p = sub.add_parser("sample", help="draw samples from a checkpoint",
                       description="Draw samples at chosen step counts; save PNG figures and arrays.")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="step counts (default 1 2 4 8)")
    p.add_argument("--n", type=int, default=None, help="samples per step count (default 2000 points / 64 images)")
    p.add_argument("--out", default=None, help="output directory (default CHECKPOINT_DIR/samples)")
    p.add_argument("--sampler", default="auto", choices=("auto", "flow_map", "euler", "heun"),
                   help="auto: flow-map jumps, or Euler for flow matching")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("npy", "pt", "both", "none"), default="npy", help="array format (default npy)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_sample)


def _sampler(choice, method):
    from sgflow.train import default_sampler

    return default_sampler(method) if choice == "auto" else choice


def cmd_sample(args) -> int:
    from sgflow.data import get_dataset
    from sgflow.plotting import image_grid, samples_figure, save_png
    from sgflow.train import generate, load_model

    _set_threads(args.threads)
    steps = _positive_ints(args.steps, "--steps")
    device = _device(args.device)
    model, cfg, ckpt = load_model(args.checkpoint, device=device, use_ema=not args.raw)
    shape = tuple(ckpt["data_shape"])
    is_image = len(shape) == 3
    n = args.n if args.n is not None else (64 if is_image else 2000)
    if n < 1:
        raise CLIError(f"--n must be >= 1, got {n}")
    out = Path(args.out) if args.out else Path(ckpt["path"]).parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    sampler = _sampler(args.sampler, cfg.method)
    g = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn((n, *shape), generator=g)
    t0 = time.perf_counter()
    samples = {k: v.cpu() for k, v in generate(model, x0.to(device), steps, sampler).items()}
    elapsed = time.perf_counter() - t0
    for k, x in samples.items():
        stem = out / f"samples_{k}step{'s' if k != 1 else ''}"
        if is_image:  # every sample at full resolution, one grid per step count
            save_png(image_grid(x, scale=max(1, round(96 / shape[-1]))), stem.with_suffix(".png"))
        if args.format in ("npy", "both"):
            import numpy as np

            np.save(stem.with_suffix(".npy"), x.numpy())
        if args.format in ("pt", "both"):
            torch.save(x, stem.with_suffix(".pt"))
    try:
        data = get_dataset(cfg.data, **cfg.data_kwargs).sample(min(n, 2000) if not is_image else min(n, 64), generator=g)
    except (FileNotFoundError, NotADirectoryError, ImportError, ValueError):
        data = None  # the data may not be on this machine (or torchvision missing): plot the samples alone
    which = "raw" if args.raw else "EMA"
    title = f"{cfg.method} on {cfg.data}, step {ckpt['step']} ({which}, {sampler})"
    if data is None:
        first = next(iter(samples.values()))
        fig = samples_figure(first, {k: v for k, v in list(samples.items())[1:]}, title=title)
    else:
        fig = samples_figure(data, samples, title=title)
    png = save_png(fig, out / "samples.png")
    print(f"{n} samples at {', '.join(map(str, steps))} steps ({sampler}) in {elapsed:.2f}s -> {out} ({png.name}"
          + (", samples_*.png" if is_image else "")
          + (f", samples_*.{args.format if args.format != 'both' else '{npy,pt}'}" if args.format != "none" else "") + ")")
    return 0


# ---------------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser("eval", help="score a checkpoint at several step counts",
                       description="Energy distance and exact flow-map error (mixtures) or a classifier Frechet "
                       "distance (digits) at several step counts.")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="step counts (default 1 2 4 8 16)")
    p.add_argument("--n", type=int, default=2000, help="samples per step count (default 2000)")
    p.add_argument("--sampler", default="auto", choices=("auto", "flow_map", "euler", "heun"))
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--baseline", action="store_true", help="also score the untrained network (same seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="where the digits feature classifier is cached "
                   "(default $SGFLOW_CACHE or ~/.cache/sgflow)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from sgflow.data import get_dataset
    from sgflow.evaluate import evaluate, format_table
    from sgflow.train import build_network, load_model

    _set_threads(args.threads)
    steps = _positive_ints(args.steps, "--steps")
    if args.n < 2:
        raise CLIError(f"--n must be >= 2, got {args.n}")
    device = _device(args.device)
    model, cfg, ckpt = load_model(args.checkpoint, device=device, use_ema=not args.raw)
    dataset = get_dataset(cfg.data, **cfg.data_kwargs)
    sampler = _sampler(args.sampler, cfg.method)
    results = {}
    if args.baseline:
        torch.manual_seed(cfg.seed)
        base, _ = build_network(cfg.model, tuple(ckpt["data_shape"]), **cfg.model_kwargs)
        results["untrained"] = evaluate(base.to(device), dataset, steps, args.n, args.seed, sampler, device, args.cache_dir,
                                        interpolant=cfg.interpolant)
    label = f"step {ckpt['step']}"
    results[label] = evaluate(model, dataset, steps, args.n, args.seed, sampler, device, args.cache_dir,
                              interpolant=cfg.interpolant)
    print(f"{cfg.method} on {cfg.data}, {'raw' if args.raw else 'EMA'} weights, sampler {sampler}, n={args.n}")
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": ckpt["path"], "step": ckpt["step"], "method": cfg.method,
                                               "data": cfg.data, "sampler": sampler, "results": results}, indent=2))
    return 0
