"""Sample quality at several step counts.

Point data (2-D sets, Gaussian mixtures):
- energy distance ED(samples, fresh data) (:func:`sgflow.metrics.energy_distance`, unbiased; its
  spread around 0 for two independent data sets of the same size is reported as the noise floor)
  and sliced Wasserstein-2;
- for Gaussian mixtures, whose exact flow map is known (:meth:`GaussianMixture.flow_map`), the
  flow-map error: for k steps, MSE_k = mean_i mean_d (F_k(x0_i) - f*(0, 1, x0_i))^2 with F_k the
  model's k-jump composite from noise x0 and f* the exact map (so k = 1 is the 1-step map
  f(0, 1, x)); and the single-jump error MSE of f(t, u, X_t) against f*(t, u, X_t) on a few (t, u)
  pairs, X_t = alpha_t X_0 + sigma_t X_1 drawn fresh.

Digits: the Frechet distance (FID's formula) between Gaussians fitted to features of a small CNN
classifier trained on digits by this module (once; cached under ``~/.cache/sgflow`` or a given
``cache_dir``), plus the classifier's accuracy and the entropy of the predicted class histogram
(log 10 = 2.30 when all digits are generated equally often).
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sgflow
from sgflow.interpolants import get_interpolant
from sgflow.metrics import energy_distance, frechet_distance, sliced_wasserstein

STEP_COUNTS = (1, 2, 4, 8, 16)
DEFAULT_PAIRS = ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.25, 0.75))
CLASSIFIER_VERSION = 1


class EvalError(ValueError):
    """Evaluation that cannot be done for this data (e.g. image metrics for a set without a feature net)."""


def default_cache_dir() -> Path:
    """$SGFLOW_CACHE, else $XDG_CACHE_HOME/sgflow, else ~/.cache/sgflow."""
    if os.environ.get("SGFLOW_CACHE"):
        return Path(os.environ["SGFLOW_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sgflow"


@torch.no_grad()
def _draw(model, x0, steps, sampler, batch=4096):
    """k-step samples from noise x0 [n, *D], in chunks (bounded memory for large n)."""
    outs = [sgflow.sample(model, x0[i:i + batch], steps=int(steps), method=sampler) for i in range(0, x0.shape[0], batch)]
    return torch.cat(outs)


# ---------------------------------------------------------------------- point data
@torch.no_grad()
def evaluate_points(model, dataset, steps=STEP_COUNTS, n: int = 2000, seed: int = 0, sampler: str = "flow_map",
                    pairs=DEFAULT_PAIRS, device="cpu", projections: int = 256, cache: dict | None = None,
                    interpolant="linear") -> dict:
    """Quality of ``model`` on point data at each step count (see module doc).

    Returns ``{"rows": [{"steps", "energy", "sliced_w", "map_mse"}...], "pairs": [{"t", "u", "mse"}...],
    "noise_floor": ED of two fresh data sets, "exact_energy": ED of the exact map's samples}``;
    ``map_mse``, ``pairs`` and ``exact_energy`` only for Gaussian mixtures (else None / []).
    The same noise, data and projections are used for every model evaluated with one ``seed``, so
    rows of different models are directly comparable; pass one ``cache`` dict to such calls to solve
    the exact flow-map ODEs (the slow part) only once. ``interpolant``: the path the model was trained
    on; the exact maps f(t, u, .) between intermediate times depend on it.
    """
    if n < 2:
        raise EvalError(f"evaluation needs at least 2 samples, got {n}")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ref = dataset.sample(n, generator=g).double()
    ref2 = dataset.sample(n, generator=g).double()
    x0 = torch.randn((n, *dataset.shape), generator=g)
    proj_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    mix = dataset.mixture
    if mix is not None:
        mix = copy.copy(mix)
        mix.interpolant = get_interpolant(interpolant)

    def sw(x):
        return sliced_wasserstein(x, ref, projections=projections, generator=torch.Generator().manual_seed(proj_seed)).item()

    cache = {} if cache is None else cache

    def exact_map(tag, t, u, x):
        key = (tag, seed, n, float(t), float(u), tuple(dataset.shape), id(dataset.mixture), mix.interpolant.name)
        if key not in cache:
            cache[key] = mix.flow_map(float(t), float(u), x)
        return cache[key]

    exact = exact_map("noise", 0.0, 1.0, x0.double()) if mix is not None else None
    rows = []
    for k in steps:
        xs = _draw(model, x0.to(device), k, sampler).double().cpu()
        finite = bool(torch.isfinite(xs).all())
        row = {
            "steps": int(k),
            "energy": energy_distance(xs, ref).item() if finite else math.inf,
            "sliced_w": sw(xs) if finite else math.inf,
            "map_mse": None,
        }
        if exact is not None:
            row["map_mse"] = (xs - exact).pow(2).mean().item() if finite else math.inf
        rows.append(row)
    out = {"rows": rows, "pairs": [], "noise_floor": energy_distance(ref2, ref).item(), "exact_energy": None, "n": n}
    if mix is not None:
        out["exact_energy"] = energy_distance(exact, ref).item()
        ip = mix.interpolant
        for t, u in pairs:
            x0p = torch.randn((n, *dataset.shape), generator=g, dtype=torch.float64)
            x1p = dataset.sample(n, generator=g).double()
            tt = torch.full((n,), float(t), dtype=torch.float64)
            xt, _ = ip.interpolate(x0p, x1p, tt)
            target = exact_map("pair", t, u, xt)
            grid = torch.tensor([float(t), float(u)])
            pred = sgflow.sample(model, xt.float().to(device), steps=1, method=sampler, grid=grid).double().cpu()
            out["pairs"].append({"t": float(t), "u": float(u), "mse": (pred - target).pow(2).mean().item()})
    return out


# ---------------------------------------------------------------------- digits
class DigitsClassifier(nn.Module):
    """Small CNN for [B, 1, H, W] digits in [-1, 1]: conv3x3(32) -> SiLU -> conv3x3(64, stride 2) ->
    SiLU -> adaptive avg pool 4x4 -> Linear(1024, 64) -> SiLU = features [B, 64] -> Linear(64, 10)."""

    feature_dim = 64

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, self.feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def _train_classifier(images, labels, seed: int = 0, epochs: int = 40):
    """Train on 85% of the set, report accuracy on the rest. Seeded and cheap (seconds on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(images.shape[0], generator=g)
    n_val = images.shape[0] * 15 // 100
    val, tr = perm[:n_val], perm[n_val:]
    net = DigitsClassifier(images.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = tr[torch.randperm(tr.numel(), generator=g)]
        for i in range(0, order.numel(), 64):
            idx = order[i:i + 64]
            x = images[idx]
            # Small random shifts so the features are not tuned to pixel-exact positions.
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(images[val]).argmax(1) == labels[val]).float().mean().item()
    return net, acc


def digits_classifier(dataset, cache_dir=None, verbose: bool = True):
    """The feature network for ``dataset``'s image shape, trained once and cached.

    Returns ``(classifier in eval mode, held-out accuracy)``. A corrupt cache file is retrained over.
    """
    shape = tuple(dataset.shape)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = cache / f"digits_classifier_{'x'.join(map(str, shape))}_v{CLASSIFIER_VERSION}.pt"
    net = DigitsClassifier(shape[0])
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(blob["state"])
            return net.eval(), float(blob["accuracy"])
        except Exception:
            pass  # unreadable or stale: retrain below
    if dataset.labels is None:
        raise EvalError(f"data set {dataset.name!r} has no labels to train a feature classifier on")
    if verbose:
        print(f"training the digits feature classifier once (cached at {path}) ...", flush=True)
    with torch.enable_grad():
        net, acc = _train_classifier(dataset.all(), dataset.labels)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"state": net.state_dict(), "accuracy": acc, "shape": list(shape)}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if verbose:
            print(f"warning: could not cache the classifier at {path}: {e}", flush=True)
    return net.eval(), acc


@torch.no_grad()
def _features(clf, x, batch=1024):
    feats, preds = [], []
    for i in range(0, x.shape[0], batch):
        f = clf.features(x[i:i + batch].float().cpu().clamp(-1, 1))
        feats.append(f)
        preds.append(clf.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def _class_entropy(preds) -> float:
    p = torch.bincount(preds, minlength=10).double()
    p = p / p.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


@torch.no_grad()
def evaluate_digits(model, dataset, steps=STEP_COUNTS, n: int = 2000, seed: int = 0, sampler: str = "flow_map",
                    device="cpu", cache_dir=None, verbose: bool = True) -> dict:
    """Frechet distance in the digits classifier's feature space at each step count.

    Returns ``{"rows": [{"steps", "frechet", "class_entropy"}...], "noise_floor": FD of two
    disjoint halves of the real set, "classifier_accuracy"}``.
    """
    if dataset.name != "digits":
        raise EvalError(
            f"image quality metrics are available for 'digits' only; for {dataset.name!r} save samples with "
            "`sgflow sample` and score them with an FID tool"
        )
    clf, acc = digits_classifier(dataset, cache_dir, verbose=verbose)
    real = dataset.all()
    real_f, _ = _features(clf, real)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(real.shape[0], generator=g)
    half = real.shape[0] // 2
    floor = frechet_distance(real_f[perm[:half]], real_f[perm[half:2 * half]]).item()
    x0 = torch.randn((n, *dataset.shape), generator=g)
    model.eval()
    rows = []
    for k in steps:
        xs = _draw(model, x0.to(device), k, sampler, batch=512).cpu()
        if not bool(torch.isfinite(xs).all()):
            rows.append({"steps": int(k), "frechet": math.inf, "class_entropy": math.nan})
            continue
        f, preds = _features(clf, xs)
        rows.append({"steps": int(k), "frechet": frechet_distance(f, real_f).item(), "class_entropy": _class_entropy(preds)})
    return {"rows": rows, "noise_floor": floor, "classifier_accuracy": acc, "n": n}


def evaluate(model, dataset, steps=STEP_COUNTS, n: int = 2000, seed: int = 0, sampler: str = "flow_map", device="cpu",
             cache_dir=None, verbose: bool = True, cache: dict | None = None, interpolant="linear") -> dict:
    """Dispatch on the data: point data -> :func:`evaluate_points`, digits -> :func:`evaluate_digits`.

    ``cache``: share one dict between calls with the same seed and n (exact flow maps are reused).
    """
    if not steps or not all(int(k) == k and k >= 1 for k in steps):
        raise EvalError(f"step counts must be positive integers, got {steps!r}")
    if dataset.is_image:
        return {"kind": "images", **evaluate_digits(model, dataset, steps, n, seed, sampler, device, cache_dir, verbose)}
    return {"kind": "points", **evaluate_points(model, dataset, steps, n, seed, sampler, device=device, cache=cache,
                                                interpolant=interpolant)}


# ---------------------------------------------------------------------- tables
def _fmt(v, width=10):
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v).rjust(width)
    if abs(v) >= 1e4:  # a diverged model: keep the columns aligned
        return f"{v:.3g}".rjust(width)
    return f"{v:.4f}".rjust(width)


def format_table(results: dict) -> str:
    """A plain-text table of ``{label: evaluate(...) result}`` with one row per step count.

    Point data: energy distance and flow-map MSE columns for every label; digits: Frechet distance.
    """
    labels = list(results)
    first = results[labels[0]]
    if first["kind"] == "points":
        metrics = [("energy", "ED")]
        if first["rows"][0]["map_mse"] is not None:
            metrics.append(("map_mse", "map MSE"))
    else:
        metrics = [("frechet", "FD"), ("class_entropy", "class H")]
    heads = [f"{name} {lab}" for key, name in metrics for lab in labels]
    width = max(10, *(len(h) for h in heads))
    lines = ["steps" + "".join(h.rjust(width + 2) for h in heads)]
    for i, row in enumerate(first["rows"]):
        cells = [_fmt(results[lab]["rows"][i][key], width) for key, _ in metrics for lab in labels]
        lines.append(f"{row['steps']:>5}" + "".join("  " + c for c in cells))
    notes = []
    if first["kind"] == "points":
        notes.append(f"ED noise floor (two independent data sets of {first['n']}): {first['noise_floor']:.4f}")
        if first.get("exact_energy") is not None:
            notes.append(f"ED of the exact flow map's samples: {first['exact_energy']:.4f}")
        for lab in labels:
            if results[lab]["pairs"]:
                pair = "  ".join(f"({p['t']:g},{p['u']:g}) {p['mse']:.4f}" for p in results[lab]["pairs"])
                notes.append(f"single-jump MSE of f(t,u,x), {lab}: {pair}")
    else:
        notes.append(f"FD noise floor (two halves of the data): {first['noise_floor']:.4f}; "
                     f"classifier held-out accuracy {first['classifier_accuracy']:.3f}; class H max = log 10 = 2.3026")
    return "\n".join(lines + notes)
