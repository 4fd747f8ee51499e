"""The quality table's summary (mean/std over seeds), verdicts, Markdown report and figure."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .config import COLORS, DATA_SPECS, METHODS, METRIC_LABELS, SAMPLER_LABELS, metrics_of

# ---------------------------------------------------------------------- aggregation
def _clean(obj):
    """JSON-safe copy: non-finite floats become None (strict JSON has no Infinity/NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _stats(values: list) -> dict:
    """mean, std (over seeds, n-1), min, max; any non-finite value (a diverged seed) makes them inf."""
    vals = [float(v) for v in values]
    if not vals:
        return {"values": [], "mean": None, "std": None, "min": None, "max": None}
    if not all(math.isfinite(v) for v in vals):
        return {"values": vals, "mean": math.inf, "std": math.inf, "min": min(vals), "max": math.inf}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"values": vals, "mean": statistics.fmean(vals), "std": std, "min": min(vals), "max": max(vals)}


def _summary(results: dict) -> dict:
    """``results["summary"]`` when it was computed in this process, else recomputed from the runs: a summary
    read back from JSON has its infinite means stored as null, which the tables cannot rank."""
    summary = results.get("summary")
    if summary and all(r["mean"] is not None for sd in summary.values() for r in sd["rows"]):
        return summary
    return summarize(results)


def summarize(results: dict) -> dict:
    """Per data set: ``rows`` (one per method, sampler, metric and NFE: mean/std/min/max over seeds),
    ``floor`` (noise floor over seeds), ``exact_energy`` and ``cost`` (per method: step time, fastest
    seed, peak memory, mean over seeds, and their ratios to flow matching's)."""
    summary = {}
    cfg = results["config"]
    for d in cfg["datasets"]:
        evals = [e for e in results["evals"] if e["dataset"] == d]
        if not evals:
            continue
        rows = []
        for key in [*cfg["methods"], "untrained"]:
            mine = [e for e in evals if e["method"] == key]
            if not mine:
                continue
            for sampler in ("flow_map", "euler", "heun"):
                for metric in metrics_of(d):
                    for k in cfg["nfe"]:
                        # A stored null is a non-finite measurement (a diverged model): it stays infinite.
                        hits = [(e["seed"], math.inf if r[metric] is None else r[metric]) for e in mine for r in e["rows"]
                                if r["sampler"] == sampler and r["nfe"] == k and metric in r]
                        if hits:
                            rows.append({"method": key, "sampler": sampler, "metric": metric, "nfe": k,
                                         **_stats([v for _, v in hits]), "seeds": [seed for seed, _ in hits]})
        # Floors depend on the evaluation seed only: one value per seed, whichever method's evaluation made it.
        floors = list({e["seed"]: e["floor"] for e in evals if e["floor"] is not None}.values())
        exact = list({e["seed"]: e["exact_energy"] for e in evals if e.get("exact_energy") is not None}.values())
        cost = {}
        for key in cfg["methods"]:
            runs = [r for r in results["runs"] if r["dataset"] == d and r["method"] == key]
            ms = [r["step_ms"] for r in runs if r["step_ms"] is not None]
            peak = [r["peak_bytes"] for r in runs if r["peak_bytes"] is not None]
            # Fastest seed: on a shared machine other work only ever slows a run down, so the least
            # disturbed of the (identical-cost) seed runs is the best estimate of the step's own time.
            cost[key] = {"step_ms": min(ms) if ms else None, "step_ms_seeds": ms,
                         "peak_bytes": statistics.fmean(peak) if peak else None,
                         "diverged_seeds": [r["seed"] for r in runs if r["diverged"]],
                         "training_method": runs[0]["training_method"] if runs else None}
        fm = cost.get("flow_matching", {})
        for c in cost.values():
            for name in ("step_ms", "peak_bytes"):
                base = fm.get(name)
                c[f"{name}_x_fm"] = c[name] / base if c[name] is not None and base else None
        summary[d] = {"rows": rows, "floor": _stats(floors) if floors else None,
                      "exact_energy": _stats(exact) if exact else None, "cost": cost,
                      "classifier_accuracy": next((e["classifier_accuracy"] for e in evals if e.get("classifier_accuracy")), None)}
    return summary


def _row(summary_d: dict, method: str, sampler: str, metric: str, nfe: int):
    for r in summary_d["rows"]:
        if (r["method"], r["sampler"], r["metric"], r["nfe"]) == (method, sampler, metric, nfe):
            return r
    return None


def _best_fm(summary_d, metric, nfe):
    """Flow matching's better sampler at this NFE (Euler or Heun, by mean)."""
    cands = [r for s in ("euler", "heun") if (r := _row(summary_d, "flow_matching", s, metric, nfe)) is not None]
    return min(cands, key=lambda r: r["mean"]) if cands else None


def _compare(a, b) -> str:
    """How row a (lower is better) compares with row b over seeds."""
    if a["mean"] < b["mean"]:
        return "better, seed ranges disjoint" if a["max"] < b["min"] else "better on the mean, seed ranges overlap"
    return "worse, seed ranges disjoint" if a["min"] > b["max"] else "worse on the mean, seed ranges overlap"


# Whose few-step jumps the verdicts judge, and against which jump rows (besides flow matching's better ODE sampler).
SUBJECTS = {"sgflow": ("meanflow",), "distill": ("meanflow_2x", "meanflow")}


def verdicts(results: dict, few=(1, 2)) -> list:
    """Per data set, metric and few-step NFE: SGFlow's jumps (and the distilled SGFlow's, when run) against
    MeanFlow's jumps (for the distilled one: MeanFlow with its total budget first) and flow matching's better ODE
    sampler (for the distilled one: its teacher's), and which row is best overall. One dict per comparison
    (``subject``; ``text`` for humans)."""
    out = []
    summary = _summary(results)
    cfg = results["config"]
    for subject, rivals in SUBJECTS.items():
        if subject not in cfg["methods"]:
            continue
        for d, sd in summary.items():
            for metric in metrics_of(d):
                for k in few:
                    if k not in cfg["nfe"]:
                        continue
                    sg = _row(sd, subject, "flow_map", metric, k)
                    if sg is None:
                        continue
                    name = METHODS[subject][0]
                    item = {"subject": subject, "dataset": d, "metric": metric, "nfe": k, subject: sg["mean"]}
                    parts = [f"{d}, {METRIC_LABELS[metric]}, {k} NFE: {name} {_fmt(sg['mean'])}"]
                    for rival in rivals:
                        mf = _row(sd, rival, "flow_map", metric, k)
                        if mf is not None:
                            item[f"vs_{rival}"] = _compare(sg, mf)
                            parts.append(f"vs {METHODS[rival][0]} {_fmt(mf['mean'])}: {item[f'vs_{rival}']}")
                    fm = _best_fm(sd, metric, k)
                    if fm is not None:
                        item["vs_flow_matching"] = _compare(sg, fm)
                        parts.append(f"vs flow matching ({SAMPLER_LABELS[fm['sampler']]}) {_fmt(fm['mean'])}: "
                                     f"{item['vs_flow_matching']}")
                    cands = [r for r in sd["rows"] if r["metric"] == metric and r["nfe"] == k and r["method"] != "untrained"]
                    best = min(cands, key=lambda r: r["mean"])
                    item["best"] = f"{METHODS[best['method']][0]} ({SAMPLER_LABELS[best['sampler']]})"
                    parts.append(f"best row: {item['best']} {_fmt(best['mean'])}")
                    div = {m: sd["cost"].get(m, {}).get("diverged_seeds") for m in (subject, *rivals, "flow_matching")}
                    div = {m: v for m, v in div.items() if v}
                    if div:
                        item["diverged"] = div
                        parts.append("diverged: " + ", ".join(f"{METHODS[m][0]} seeds {v}" for m, v in div.items()))
                    item["text"] = "; ".join(parts)
                    out.append(item)
    return out


# ---------------------------------------------------------------------- Markdown
def _fmt(v) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "diverged"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _cell(r, bold=False) -> str:
    if r is None:
        return "-"
    text = _fmt(r["mean"]) + (f" ± {_fmt(r['std'])}" if r["std"] and math.isfinite(r["mean"]) else "")
    return f"**{text}**" if bold else text


def markdown(results: dict, diagonal: bool = True) -> str:
    """The Markdown report: header (command, machine, wall time, settings), one table per data set and
    metric (mean ± std over seeds, best mean per column in bold), the cost table and the verdicts.

    ``diagonal=False``: only each method's natural sampler (jumps; Euler and Heun for flow matching)."""
    cfg, summary = results["config"], _summary(results)
    m = results["machine"]
    nfe = cfg["nfe"]
    lines = ["# Quality vs network evaluations", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [
        f"Machine: {m['processor']}, {m['cpu_count']} CPU cores, torch {m['torch']}, {m['torch_threads']} thread(s), "
        f"device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else "") + (f", nice {m['nice']}" if m.get("nice") is not None else "")
        + f". Wall time {results.get('wall_time_s', 0):.0f} s"
        + (f", CPU time {results['cpu_time_s']:.0f} s" if results.get("cpu_time_s") else "") + f" (preset {cfg['preset']}).",
        "",
        f"Seeds {cfg['seeds']}; training steps {cfg['train_steps']}; lr {cfg['lr']} ({cfg['lr_schedule']}, "
        f"{cfg['warmup']} warm-up steps), EMA {cfg['ema_decay']}, grad clip {cfg['grad_clip']}, time sampler "
        f"{cfg['time_dist']} with diagonal fraction {cfg['diagonal_fraction']}; {cfg['n_eval']} samples per evaluation. "
        + (f"Every method's learning rate and its own knob were tuned with the same number of trials on seed "
         f"{results['tuning']['seed']}, never a reported seed (section *Tuning* below): the chosen values replace "
         "the lr, diagonal fraction and EMA above." if results.get("tuning")
         else "Every method gets these settings; nothing was searched for any method."),
        "",
        "Losses: " + ", ".join(f"{v['label']} `{v['training_method']}`" for v in results["methods"].values()) + ".",
        "Networks: " + "; ".join(f"{d}: {n}" for d, n in results["networks"].items()) + ".",
        "",
        "Samplers: *jumps* = flow-map jumps (k jumps = k NFE); *Euler* / *Heun* = ODE integration of the "
        "diagonal f~(t,t,x) at the same number of network evaluations (Heun: 2 per step, so none at 1 NFE). "
        "Cells: mean ± std over seeds; bold: best mean in the column. Lower is better everywhere.",
        "",
    ]
    for d, sd in summary.items():
        floor = sd["floor"]
        for metric in metrics_of(d):
            lines.append(f"## {d}: {METRIC_LABELS[metric]}")
            lines.append("")
            if metric == "energy" and floor:
                extra = f" Exact flow map's samples: {_fmt(sd['exact_energy']['mean'])}." if sd.get("exact_energy") else ""
                lines += [f"Noise floor (energy distance between two fresh data draws, one per seed): "
                          f"{', '.join(_fmt(v) for v in floor['values'])}; values within "
                          f"±{_fmt(max(abs(v) for v in floor['values']))} are noise.{extra}", ""]
            if metric == "frechet" and floor:
                acc = sd.get("classifier_accuracy")
                lines += [f"Floor (two disjoint halves of the real set): {_fmt(floor['mean'])}"
                          + (f"; feature classifier held-out accuracy {acc:.3f}" if acc else "") + ".", ""]
            lines.append("| method | sampler | " + " | ".join(f"{k} NFE" for k in nfe) + " |")
            lines.append("|---|---|" + "---|" * len(nfe))
            table = [r for r in sd["rows"] if r["metric"] == metric
                     and (diagonal or r["method"] == "flow_matching" or r["sampler"] == "flow_map")]
            best = {k: min((r["mean"] for r in table if r["nfe"] == k and r["method"] != "untrained"), default=None) for k in nfe}
            for key in [*cfg["methods"], "untrained"]:
                for sampler in ("flow_map", "euler", "heun"):
                    if not diagonal and key not in ("flow_matching", "untrained") and sampler != "flow_map":
                        continue
                    cells = [_row(sd, key, sampler, metric, k) for k in nfe]
                    if all(c is None for c in cells):
                        continue
                    label = METHODS[key][0] if key in METHODS else "untrained network"
                    lines.append(f"| {label} | {SAMPLER_LABELS[sampler]} | " + " | ".join(
                        _cell(c, bold=c is not None and key != "untrained" and c["mean"] == best[c["nfe"]]) for c in cells) + " |")
            lines.append("")
    lines += ["## Cost per training step (same runs)", "",
              "Median wall time per step over 25-step logging intervals, and the peak tensor memory of one step "
              "(forward, backward, Adam; `sgflow.memory.PeakTensorBytes`); time: fastest seed (other work on a "
              "shared machine only slows runs down), memory: mean over seeds; "
              "x FM: ratio to flow matching.", ""]
    ds = list(summary)
    lines.append("| method | " + " | ".join(f"{d} ms/step (x FM) | {d} peak KiB (x FM)" for d in ds) + " |")
    lines.append("|---|" + "---|---|" * len(ds))
    for key in cfg["methods"]:
        cells = []
        for d in ds:
            c = summary[d]["cost"].get(key, {})
            ms, px = c.get("step_ms"), c.get("peak_bytes")
            cells.append(f"{ms:.2f} ({c['step_ms_x_fm']:.2f})" if ms is not None and c.get("step_ms_x_fm") else "-")
            cells.append(f"{px / 1024:.0f} ({c['peak_bytes_x_fm']:.2f})" if px is not None and c.get("peak_bytes_x_fm") else "-")
        lines.append(f"| {METHODS[key][0]} | " + " | ".join(cells) + " |")
    div = [(d, k, c["diverged_seeds"]) for d in ds for k, c in summary[d]["cost"].items() if c["diverged_seeds"]]
    lines.append("")
    if div:
        lines += ["Diverged runs: " + "; ".join(f"{METHODS[k][0]} on {d}, seeds {s}" for d, k, s in div) + ".", ""]
    lines += tuning_markdown(results)
    vs = results.get("verdicts") or verdicts(results)
    if vs:
        lines += ["## SGFlow at few steps, as measured here", ""] + [f"- {v['text']}" for v in vs] + [""]
    return "\n".join(lines)


def tuning_markdown(results: dict) -> list:
    """The *Tuning* section's lines (none without a tuning stage): per method its search space and, per data
    set, the chosen settings with their score and how many trials diverged."""
    tun = results.get("tuning")
    if not tun or not tun.get("trials"):
        return []
    cfg = results["config"]
    ds = [d for d in cfg["datasets"] if any(t["dataset"] == d for t in tun["trials"])]
    short = {"lr": "lr", "diagonal_fraction": "diag", "ema_decay": "EMA"}
    lines = ["## Tuning (equal budget)", "",
             f"Every method: one training run per trial on seed {tun['seed']} with the budget above, scored by the "
             f"mean over {tun['nfe']} NFE of the headline metric (flow-map MSE; Frechet distance on digits) with "
             "its natural sampler (flow matching: the better of Euler and Heun). Cell: the chosen setting, its "
             "score, and the diverged trials if any.", "",
             "| method | trials | " + " | ".join(ds) + " |", "|---|---|" + "---|" * len(ds)]
    for key in cfg["methods"]:
        space = tun["space"].get(key)
        if not space:
            continue
        n = math.prod(len(v) for v in space.values())
        desc = " x ".join(f"{short.get(k, k)} {{{', '.join(_fmt(x) for x in v)}}}" for k, v in space.items())
        cells = []
        for d in ds:
            mine = [t for t in tun["trials"] if t["dataset"] == d and t["method"] == key]
            if not mine:
                cells.append("-")
                continue
            best = min(mine, key=lambda t: (t["score"] if t["score"] is not None else math.inf, t["index"]))
            score = best["score"] if best["score"] is not None else math.inf
            div = sum(1 for t in mine if t["diverged"])
            cell = ", ".join(f"{short.get(k, k)} {_fmt(v)}" for k, v in best["settings"].items()) if math.isfinite(score) \
                else "every trial diverged (untuned settings used)"
            cell += f" ({_fmt(score)})" if math.isfinite(score) else ""
            cells.append(cell + (f"; {div} of {len(mine)} diverged" if div else ""))
        lines.append(f"| {METHODS[key][0]} | {n}: {desc} | " + " | ".join(cells) + " |")
    return lines + [""]


# ---------------------------------------------------------------------- figure
def figure(results: dict, path) -> Path:
    """Metric vs NFE (log-x), one line per method with its natural sampler (flow matching: Euler solid,
    Heun dashed; the untrained network dotted grey), seeds shaded min-max; one row per data set."""
    # A Figure with its own Agg canvas: files only, no display, and neither pyplot's global figure list
    # nor the process's backend (matplotlib.use) is touched.
    from sgflow._extras import require

    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "the quality figure").FigureCanvasAgg
    Figure = require("matplotlib.figure", "the quality figure").Figure

    cfg, summary = results["config"], _summary(results)
    ds = list(summary)
    ncol = max(len(metrics_of(d)) for d in ds)
    fig = Figure(figsize=(5.2 * ncol, 3.6 * len(ds)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ds), ncol, squeeze=False)
    for i, d in enumerate(ds):
        sd = summary[d]
        for j in range(ncol):
            ax = axes[i][j]
            if j >= len(metrics_of(d)):
                ax.axis("off")
                continue
            metric = metrics_of(d)[j]
            # A diverged run's numbers (1e4 and up) would flatten every other curve: draw a method over its
            # seeds that did not diverge (the label says how many), or not at all, and say so in the title;
            # the tables keep every number.
            bad = {k: set(sd["cost"].get(k, {}).get("diverged_seeds") or ()) for k in cfg["methods"]}
            curves = [(k, s) for k in cfg["methods"] for s in (("euler", "heun") if k == "flow_matching" else ("flow_map",))]
            curves.append(("untrained", "euler"))
            notes, drawn_max = [], []
            for key, sampler in curves:
                rows = [r for k in cfg["nfe"] if (r := _row(sd, key, sampler, metric, k)) is not None]
                if not rows:
                    continue
                keep = [[v for v, sd_ in zip(r["values"], r["seeds"]) if sd_ not in bad.get(key, ())] for r in rows]
                n_all, n_kept = len(rows[0]["values"]), len(keep[0])
                if not n_kept:
                    notes.append(f"{METHODS[key][0]}: every seed diverged, not drawn")
                    continue
                x = [r["nfe"] for r in rows]
                stats = [_stats(v) for v in keep]
                fin = lambda v: v if v is not None and math.isfinite(v) else float("nan")  # noqa: E731
                color = COLORS.get(key, "#aaaaaa")
                style = ":" if key == "untrained" else ("--" if sampler == "heun" else "-")
                label = ("untrained" if key == "untrained" else METHODS[key][0]) + (
                    f" ({SAMPLER_LABELS[sampler]})" if key == "flow_matching" else "")
                if n_kept < n_all:
                    label += f" [{d}: {n_kept} of {n_all} seeds]"
                    notes.append(f"{METHODS[key][0]}: {n_all - n_kept} of {n_all} seeds diverged, the others drawn")
                ax.plot(x, [fin(st["mean"]) for st in stats], style, color=color, marker="o" if key != "untrained" else None,
                        ms=3, lw=1.6, label=label)
                if key != "untrained" and n_kept > 1:
                    ax.fill_between(x, [fin(st["min"]) for st in stats], [fin(st["max"]) for st in stats], color=color,
                                    alpha=0.15, lw=0)
                drawn_max += [st["max"] for st in stats if st["max"] is not None and math.isfinite(st["max"])]
            floor = max(abs(v) for v in sd["floor"]["values"]) if sd["floor"] and sd["floor"]["values"] else None
            if metric == "energy" and floor is not None:
                ax.axhline(floor, color="k", lw=0.8, ls="--", label="noise floor: max |ED(data, data')| over seeds")
            if metric == "frechet" and floor is not None:
                ax.axhline(floor, color="k", lw=0.8, ls="-.", label="floor: FD(real half, real half)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(cfg["nfe"], [str(k) for k in cfg["nfe"]])
            ax.minorticks_off()
            if metric == "energy":
                # The unbiased energy distance can dip below 0 near the floor: a symmetric log axis, linear
                # within the floor, and cut at minus the floor (anything below is noise).
                lin = max(floor if floor is not None else 1e-3, 1e-4)
                ax.set_yscale("symlog", linthresh=lin, linscale=0.5)
                top = max([abs(v) for v in drawn_max] + [10 * lin])
                ax.set_ylim(0, 1.5 * top)
                ax.set_yticks([0] + [10.0**e for e in range(math.ceil(math.log10(lin)), math.floor(math.log10(1.5 * top)) + 1)])
            else:
                ax.set_yscale("log")
            ax.set_xlabel("network evaluations (NFE)")
            ax.set_title("\n".join([f"{d}: {METRIC_LABELS[metric]}", *notes]), fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
    seen = {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
    height = 3.6 * len(ds)
    legend_rows = math.ceil(len(seen) / 5)
    top = 1 - (0.3 + 0.2 * legend_rows) / height  # inches kept free for the title and the legend
    fig.suptitle(f"Quality vs NFE (mean over seeds {cfg['seeds']}, shaded: min-max), lower is better",
                 y=1 - 0.08 / height, fontsize=11)
    fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.32 / height),
               ncol=min(len(seen), 5), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def render(out_dir, diagonal: bool = True) -> dict:
    """Recompute the summary and verdicts of ``out_dir``'s ``quality.json`` from its per-run records and
    rewrite the JSON, ``quality.md`` and ``quality.png`` (no training). Returns the results.

    Values that were non-finite when measured are stored as null and count as infinite."""
    out = Path(out_dir)
    path = out / "quality.json"
    if not path.exists():
        raise FileNotFoundError(f"no quality.json in {out}")
    results = json.loads(path.read_text())
    results["summary"] = summarize(results)
    results["verdicts"] = verdicts(results)
    path.write_text(json.dumps(_clean(results), indent=1) + "\n")
    (out / "quality.md").write_text(markdown(results, diagonal=diagonal))
    figure(results, out / "quality.png")
    return results


def compare_settings(runs: dict) -> str:
    """Which of several runs of the table (one setting each, e.g. two learning rates) wins, per data set
    and method: ``runs`` maps a label to a results dict or an output directory holding quality.json.

    Score (lower is better): the geometric mean over NFE of the headline metric's seed mean, each method
    with its natural sampler (flow matching: the better of Euler and Heun at each NFE). A run with a
    diverged seed scores infinite for that method. Returns a Markdown table with the winner per row.
    """
    loaded = {}
    for label, res in runs.items():
        if not isinstance(res, dict):
            res = json.loads((Path(res) / "quality.json").read_text())
        res["summary"] = summarize(res)
        loaded[label] = res
    labels = list(loaded)
    lines = ["| data set | method | " + " | ".join(labels) + " | winner |", "|---|---|" + "---|" * (len(labels) + 1)]
    datasets = [d for d in DATA_SPECS if all(d in r["summary"] for r in loaded.values())]
    for d in datasets:
        metric = metrics_of(d)[0]
        for key in METHODS:
            scores = {}
            for label, res in loaded.items():
                sd = res["summary"][d]
                if key not in res["config"]["methods"]:
                    continue
                if sd["cost"][key]["diverged_seeds"]:
                    scores[label] = math.inf
                    continue
                vals = []
                for k in res["config"]["nfe"]:
                    r = _best_fm(sd, metric, k) if key == "flow_matching" else _row(sd, key, "flow_map", metric, k)
                    if r is not None:
                        vals.append(r["mean"])
                ok = vals and all(math.isfinite(v) and v > 0 for v in vals)
                scores[label] = math.exp(statistics.fmean(math.log(v) for v in vals)) if ok else math.inf
            if len(scores) < len(labels):
                continue
            best = min(scores, key=scores.get)
            lines.append(f"| {d} | {METHODS[key][0]} | " + " | ".join(_fmt(scores[lab]) for lab in labels)
                         + f" | {best if math.isfinite(scores[best]) else '-'} |")
    return "\n".join(lines) + "\n"


