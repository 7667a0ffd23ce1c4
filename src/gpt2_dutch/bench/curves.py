"""The evaluation curves of `gpt2-dutch bench quality --shape` and `--budgets`: where the snapshots go, when ours
first reaches the peer's final figure, the rows of the report and its plots. Pure functions (matplotlib only
inside the plots), so the arithmetic is tested on made-up curves."""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from gpt2_dutch.core.files import write_bytes_atomic, write_text_atomic

CURVE_POINTS, QUICK_CURVE_POINTS = 8, 4
TOKENS_RATIO_TARGET = 0.5  # issue #25: ours reaches the tuned peer's final figure in at most half the tokens
BUDGET_RATIO_TARGET = 0.80  # as `bench quality` at one budget (report.TARGETS["quality_bpb_ratio"])


def snapshot_steps(total_steps: int, points: int) -> list[int]:
    """The optimizer steps at which both sides are scored: every `total_steps // points` steps, the last one
    being the final step (so a run whose length is not a multiple ends on its final model)."""
    every = max(1, total_steps // points)
    steps = [every * k for k in range(1, points) if every * k < total_steps]
    return [*steps, total_steps]


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
    """(tokens, how) at which the curve [(tokens, bits per byte), ...] first reaches `target` (<=).

    how: "interpolated" (linearly between the last point above the target and the first at or below it),
    "at_first_point" (the first point already reaches it: the tokens are an upper bound, nothing was scored
    before) or "never" (tokens None)."""
    points = sorted(curve)
    for i, (tokens, bpb) in enumerate(points):
        if bpb > target:
            continue
        if i == 0:
            return tokens, "at_first_point"
        t0, b0 = points[i - 1]
        return t0 + (b0 - target) / (b0 - bpb) * (tokens - t0), "interpolated"
    return None, "never"


def reach(ours_curve: list[dict[str, Any]], peer_final: float, total_tokens: int) -> dict[str, Any]:
    """When ours first reaches the peer's final bits per byte, in tokens and as a fraction of the run's tokens."""
    tokens, how = tokens_to_reach([(p["tokens"], p["bits_per_byte"]) for p in ours_curve], peer_final)
    return {"target_bits_per_byte": peer_final, "tokens": tokens, "how": how,
            "ratio": None if tokens is None else tokens / total_tokens}


def mean_ratio(reaches: list[dict[str, Any]]) -> float | None:
    """The mean of the per-seed ratios; None when a seed never reached the peer's figure (no finite mean)."""
    ratios = [r["ratio"] for r in reaches]
    return None if any(r is None for r in ratios) else statistics.fmean(ratios)


def ratio_text(r: dict[str, Any]) -> str:
    if r["ratio"] is None:
        return "never reached"
    return f"{'<= ' if r['how'] == 'at_first_point' else ''}{r['ratio']:.3f}"


# ---- the report: rows like report.table_rows' (benchmark, gpt2-dutch, baseline, ratio), a section, the plots

def sample_efficiency_rows(se: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    shape, n = se["shape"], se["tokens"]
    rows = []
    for run in se["runs"]:
        o, p = run["ours"], run["peer"]
        rows.append((f"{shape}, {n / 1e6:.3g}M tokens, seed {run['seed']}: final held-out bits per byte",
                     f"{o['final_bits_per_byte']:.4f}", f"{p['final_bits_per_byte']:.4f}",
                     f"{o['final_bits_per_byte'] / p['final_bits_per_byte']:.3f}"))
        rows.append((f"{shape}, seed {run['seed']}: tokens until ours reaches the peer's final / {n / 1e6:.3g}M",
                     _tokens(run["reach"]["tokens"]), "", ratio_text(run["reach"])))
    if len(se["runs"]) > 1:
        mean = se["tokens_ratio"]
        rows.append((f"{shape}: tokens to the peer's final figure, mean of {len(se['runs'])} seeds", "", "",
                     "never reached (a seed)" if mean is None else f"{mean:.3f}"))
    sweep = se["peer"]["lr_sweep"]
    rows.append((f"{shape}: the peer's learning-rate sweep (seed {sweep['seed']}), final bits per byte", "",
                 ", ".join(f"{lr:g}: {b:.4f}" for lr, b in zip(sweep["learning_rates"], sweep["final_bits_per_byte"],
                                                              strict=True)),
                 f"best {sweep['chosen']:g}" + (" (an end of the sweep: widen --peer-lrs)" if sweep.get("at_edge")
                                                else "")))
    return rows


def _tokens(t: float | None) -> str:
    return "-" if t is None else f"{t / 1e6:.3g}M"


def budgets_rows(b: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    from gpt2_dutch.bench.report import quality_rows

    # quality_rows' mean and time rows do not name the budget: each row is labelled with it
    return [(f"{name}: {label}", *rest) for name, q in zip(b["budget_names"], b["budgets"], strict=True)
            for label, *rest in quality_rows(q)]


def section(r: dict[str, Any]) -> str:
    """The markdown of the curve modes: a table, the settings, the plot's file."""
    if "sample_efficiency" in r:
        se = r["sample_efficiency"]
        rows = sample_efficiency_rows(se)
        head = (f"Sample efficiency at `{se['shape']}` ({se['tokens']:,} tokens, {len(se['points'])} points): "
                f"{se['heldout']['documents']} held-out documents; ours: {_settings(se['ours']['settings'])}; peer "
                f"({se['peer']['name']}): {_settings(se['peer']['settings'])}.")
        plot, other = se.get("plot"), "peer"
    else:
        b = r["quality_budgets"]
        rows = budgets_rows(b)
        head = (f"Quality at budgets {', '.join(b['budget_names'])}: ours (`--model-size auto`) against the textbook "
                "Trainer, ratio = ours / textbook bits per byte (lower is better).")
        plot, other = b.get("plot"), "baseline"
    table = [f"| measure | gpt2-dutch | {other} | ratio |", "|---|---:|---:|---:|",
             *(f"| {a} | {o} | {p} | {x} |" for a, o, p, x in rows)]
    return "\n".join([head, "", *table, *(["", f"Plot: {Path(plot).name}"] if plot else [])]) + "\n"


def _settings(s: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in s.items())


def extra_ratios(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The curve modes' figures in report.ratios' form (name -> value, target, met), for the bar chart."""
    out: dict[str, tuple[float, float]] = {}
    if "sample_efficiency" in r and r["sample_efficiency"]["tokens_ratio"] is not None:
        se = r["sample_efficiency"]
        out[f"quality_{se['shape']}_tokens_to_peer"] = (se["tokens_ratio"], TOKENS_RATIO_TARGET)
    for name, q in zip(r.get("quality_budgets", {}).get("budget_names", []),
                       r.get("quality_budgets", {}).get("budgets", []), strict=True):
        out[f"quality_bpb_ratio_{name}"] = (q["ratio"], BUDGET_RATIO_TARGET)
    judged = not r["quick"]  # --quick runs on the built-in sample: not judged, as report.ratios does
    return {k: {"value": v, "target": t if judged else None, "met": v <= t if judged else None}
            for k, (v, t) in out.items()}


def curve_plot_path(json_path: Path) -> Path:
    """The plot of the curves, next to the JSON report: bench.json -> bench_curves.png."""
    return json_path.with_name(json_path.stem + "_curves.png")


def write_section(r: dict[str, Any], markdown_path: Path, plot_path: Path) -> None:
    """The curve plot, and the section appended to the markdown report that report.write_outputs wrote."""
    key = "sample_efficiency" if "sample_efficiency" in r else "quality_budgets"
    r[key]["plot"] = str(plot_path)  # (the JSON report, written before, names the same file)
    (plot_sample_efficiency if key == "sample_efficiency" else plot_budgets)(r[key], plot_path)
    text = section(r)
    write_text_atomic(markdown_path, markdown_path.read_text(encoding="utf-8") + "\n" + text)
    print(text, end="")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())


def _axes(title: str, xlabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.grid(alpha=0.3)
    return fig, ax


def plot_sample_efficiency(se: dict[str, Any], path: Path) -> None:
    """Both curves per seed (ours solid, the peer dashed), the peer's final figure and where ours reaches it."""
    fig, ax = _axes(f"{se['shape']}: ours vs the tuned AdamW peer (lr {se['peer']['learning_rate']:g}), "
                    f"same tokens per step", "tokens seen (millions)")
    for i, run in enumerate(se["runs"]):
        shade = 1.0 - 0.35 * i / max(1, len(se["runs"]) - 1)
        for side, style, color in (("ours", "-", "tab:blue"), ("peer", "--", "tab:orange")):
            curve = run[side]["curve"]
            ax.plot([p["tokens"] / 1e6 for p in curve], [p["bits_per_byte"] for p in curve], style,
                    marker="os^vD"[i % 5], ms=3, color=color, alpha=shade, label=f"{side}, seed {run['seed']}")
        ax.axhline(run["reach"]["target_bits_per_byte"], color="tab:orange", lw=0.6, alpha=0.5)
        if run["reach"]["tokens"] is not None:
            ax.plot([run["reach"]["tokens"] / 1e6], [run["reach"]["target_bits_per_byte"]], "k*", ms=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_budgets(b: dict[str, Any], path: Path) -> None:
    """Bits per byte against the seconds each side trained, one point per seed and budget, the means joined."""
    fig, ax = _axes("ours (--model-size auto) vs the textbook Trainer at each budget", "seconds of training")
    for side, color in (("ours", "tab:blue"), ("baseline", "tab:orange")):
        means = []
        for q in b["budgets"]:
            xs = [run[side]["train_seconds"] for run in q["runs"]]
            ys = [run[side]["bits_per_byte"] for run in q["runs"]]
            ax.plot(xs, ys, "o", color=color, alpha=0.4, ms=4)
            means.append((statistics.fmean(xs), statistics.fmean(ys)))
        ax.plot(*zip(*means, strict=True), "-", marker="s", color=color,
                label="ours" if side == "ours" else "textbook")
    ax.legend(fontsize=8)
    _save(fig, path)
