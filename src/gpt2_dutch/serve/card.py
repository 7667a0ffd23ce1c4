"""The playground's model card (`GET /v1/model_card`): a view of `model_card.card_facts`, the one source of what a
card says: size, training tokens, the last evaluation, the loss curves and how the run was trained. Anything the
records do not hold is left out, never guessed; no local path is part of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt2_dutch.runs.card import card_facts, finite

MAX_CURVE_POINTS = 400  # the page draws these; a long run's metrics are thinned evenly
RUN_SETTINGS = ("optimizer", "schedule", "learning_rate", "total_steps", "tokens_per_step")


def model_card(model_dir: Path, parameters: int, name: str) -> dict[str, Any]:
    """The card's JSON for the model in `model_dir` (served as `name`, `parameters` counted on the loaded model)."""
    facts = card_facts(model_dir)
    m, t = facts["model"], facts["training"]
    card: dict[str, Any] = {
        "name": name, "parameters": parameters, "layers": m["n_layer"], "width": m["n_embd"], "heads": m["n_head"],
        "context": m["context"], "vocab_size": m["vocab_size"],
    }
    settings = t.get("settings") or {}
    run = {"model_size": m.get("size"), "dataset": (facts.get("dataset") or {}).get("name"),
           "precision": t.get("precision"), **{k: settings.get(k) for k in RUN_SETTINGS},
           "status": t.get("status"), "started_at": t.get("started_at")}
    run = {k: v for k, v in run.items() if v is not None}
    if run:
        card["run"] = run
    if t.get("tokens") is not None:
        card["training_tokens"] = int(t["tokens"])
    ev = facts.get("eval")
    if ev and finite(ev.get("loss")):
        card["eval"] = {"step": ev["step"], "loss": ev["loss"], "perplexity": ev.get("perplexity"),
                        "bits_per_byte": ev.get("bits_per_byte")}
    evals = [(r["step"], r["eval_loss"]) for r in facts.get("curve") or []
             if finite(r.get("eval_loss")) and isinstance(r.get("step"), int)]
    card["loss_curve"] = {"train": _thin(list(facts.get("train_curve") or [])), "eval": _thin(evals)}
    return card


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= MAX_CURVE_POINTS:
        return points
    stride = len(points) / MAX_CURVE_POINTS
    return [points[int(i * stride)] for i in range(MAX_CURVE_POINTS - 1)] + [points[-1]]
