"""The model's card for the playground (`GET /v1/model_card`): size, training tokens, eval loss, bits per byte, loss
curve, read from the model's config.json and, where the model is a run's final_model, the run's run_config.json
and metrics.jsonl (the run directory is final_model's parent). Anything missing is left out, never guessed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..model_card import read_metrics_records

MAX_CURVE_POINTS = 400  # the page draws these; a long run's metrics are thinned evenly


def model_card(model_dir: Path, parameters: int, name: str) -> dict[str, Any]:
    config = _read_json(model_dir / "config.json") or {}
    card: dict[str, Any] = {
        "name": name, "parameters": parameters, "layers": config.get("n_layer"), "width": config.get("n_embd"),
        "heads": config.get("n_head"), "context": config.get("n_positions"), "vocab_size": config.get("vocab_size"),
    }
    run_dir = model_dir.parent if model_dir.name == "final_model" else None
    run = _read_json(run_dir / "run_config.json") if run_dir else None
    if run:
        card["run"] = {k: run.get(k) for k in ("model_size", "dataset_path", "precision", "optimizer", "schedule",
                                               "learning_rate", "total_steps", "tokens_per_step", "status",
                                               "started_at") if run.get(k) is not None}
    records = read_metrics_records(run_dir / "metrics.jsonl") if run_dir else []
    train = [(r["step"], r["loss"]) for r in records if _finite(r.get("loss")) and isinstance(r.get("step"), int)]
    evals = [r for r in records if _finite(r.get("eval_loss")) and isinstance(r.get("step"), int)]
    tokens = [r["tokens"] for r in records if isinstance(r.get("tokens"), (int, float))]
    if tokens:
        card["training_tokens"] = int(max(tokens))
    if evals:
        last = evals[-1]
        card["eval"] = {"step": last["step"], "loss": last["eval_loss"], "perplexity": last.get("eval_ppl"),
                        "bits_per_byte": last.get("eval_bpb")}
    card["loss_curve"] = {"train": _thin(train), "eval": _thin([(r["step"], r["eval_loss"]) for r in evals])}
    return card


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= MAX_CURVE_POINTS:
        return points
    stride = len(points) / MAX_CURVE_POINTS
    return [points[int(i * stride)] for i in range(MAX_CURVE_POINTS - 1)] + [points[-1]]
