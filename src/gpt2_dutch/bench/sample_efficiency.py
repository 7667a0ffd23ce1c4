"""Sample efficiency at a fixed shape: held-out bits per byte against tokens seen, ours against a tuned AdamW peer.

    gpt2-dutch bench quality --shape nano --tokens 2e7                # seeds 42 and 43, the peer's lr swept
    gpt2-dutch bench quality --shape tiny --tokens 2e7 --peer-lrs 5e-4,1e-3,2e-3,4e-3
    gpt2-dutch bench quality --shape nano --tokens 4e4 --quick        # the built-in sample, seconds (tests)

What happens, in order:
1. The data as for the time budget (quality.prepare): whole documents held out, the tokenizer, our dataset made
   by `gpt2-dutch preprocess` with its defaults (with --quick: 128-token chunks, so the sample holds enough).
2. Ours: `gpt2-dutch train --model-size SHAPE --max-tokens N --seed S` (plus --ours-config), with a checkpoint
   every total/POINTS steps kept (--save-every, --keep-checkpoints) and one evaluation of its own, at the end
   (--eval-every): nothing of its training changes. The steps are the plan's (train.plan.make_plan), read
   before it trains.
3. The peer (baselines.ADAMW_PEER, peer_recipe): a plain GPT2LMHeadModel of the same shape trained with the
   Trainer on the train split of the same dataset (the same chunks), with ours' context and tokens per step
   (batch and accumulation read from its run_config.json) for the same number of steps, saving the model at the
   same steps. Its learning rate is the best final held-out figure of --peer-lrs on the first seed; the other
   seeds use that rate. Why the first seed only: it is how a tuned baseline is set (once, then rerun), it costs
   one run per rate instead of one per rate and seed, and choosing on the held-out documents themselves favours
   the peer, so the ratio below can only be conservative.
4. Every snapshot of both sides is scored on the held-out documents with `gpt2-dutch evaluate` (quality._score):
   identical code for both curves. The ratio: the tokens at which ours first reaches the peer's final figure
   (linear between points, curves.tokens_to_reach) over N, per seed and their mean.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpt2_dutch.bench.curves import CURVE_POINTS, QUICK_CURVE_POINTS, mean_ratio, reach, snapshot_steps
from gpt2_dutch.bench.quality import FIRST_SEED, SHOWN_SETTINGS, _free_memory, _score, prepare
from gpt2_dutch.bench.report import say
from gpt2_dutch.runs.records import metric_kind, read_metrics, read_run_config

QUICK_CHUNK = 128  # --quick: the built-in sample holds ~15 1024-token chunks, too few for a curve
# What the bench sets for ours in this mode, on top of quality.SET_BY_BENCH: --ours-config may not change them.
SET_BY_SHAPE = ("model_size", "save_every", "keep_checkpoints")


def bench_sample_efficiency(text: Path, tokenizer: str | None, tmp: Path, quick: bool, shape: str, tokens: float,
                            seeds: int, peer_lrs: list[float], ours_config: str | None,
                            overrides: dict[str, Any]) -> dict[str, Any]:
    from gpt2_dutch.bench.baselines import ADAMW_PEER

    data = prepare(text, tokenizer, tmp, quick, chunk_size=QUICK_CHUNK if quick else None, textbook=False)
    points = QUICK_CURVE_POINTS if quick else CURVE_POINTS
    runs: list[dict[str, Any]] = []
    sweep: dict[str, Any] = {}
    for i in range(seeds):
        seed = FIRST_SEED + i
        say(f"quality --shape {shape}, seed {seed}: gpt2-dutch train --max-tokens {tokens:g}")
        ours = _ours_curve(data, shape, tokens, seed, overrides, points)
        if not sweep:
            sweep, peer = _sweep(data, ours, peer_lrs, seed)
        else:
            say(f"quality --shape {shape}, seed {seed}: the AdamW peer at lr {sweep['chosen']:g}")
            peer = _peer_curve(data, ours, sweep["chosen"], seed, f"peer-{seed}")
        runs.append({"seed": seed, "ours": ours, "peer": peer,
                     "reach": reach(ours["curve"], peer["final_bits_per_byte"], ours["tokens"])})
    first = runs[0]["ours"]
    settings = {k: first["settings"][k] for k in ("context", "batch_size", "gradient_accumulation_steps",
                                                  "tokens_per_step")}
    return {
        "shape": shape, "tokens_requested": tokens, "tokens": first["tokens"], "steps": first["steps"],
        "points": [p["step"] for p in first["curve"]], "seeds": [r["seed"] for r in runs], **data["report"],
        "ours": {"name": Path(ours_config).stem if ours_config else "gpt2-dutch defaults", "config_file": ours_config,
                 "overrides": overrides, "settings": first["settings"]},
        "peer": {"name": "tuned AdamW Trainer", "learning_rate": sweep["chosen"], "lr_sweep": sweep,
                 "settings": {**ADAMW_PEER, "learning_rate": sweep["chosen"], **settings}},
        "runs": runs, "tokens_ratio": mean_ratio([r["reach"] for r in runs]),
        "seeds_reached": sum(r["reach"]["ratio"] is not None for r in runs),
        "ours_final_bits_per_byte": statistics.fmean(r["ours"]["final_bits_per_byte"] for r in runs),
        "peer_final_bits_per_byte": statistics.fmean(r["peer"]["final_bits_per_byte"] for r in runs),
    }


def planned_steps(cfg: Any) -> tuple[int, int]:
    """(optimizer steps, tokens per step) that `train(cfg)` will run: its plan, made before it trains (a fixed
    shape with --max-tokens measures nothing, so the plan is the same one train makes)."""
    from gpt2_dutch.data.chunks import read_manifest
    from gpt2_dutch.train.plan import make_plan

    manifest = read_manifest(cfg.dataset_path)
    plan = make_plan(replace(cfg, quiet=True), manifest, manifest["splits"]["train"]["chunks"],
                     manifest["tokenizer"]["eos_token_id"])
    return plan.total_steps, plan.tokens_per_step


def _ours_curve(data: dict[str, Any], shape: str, tokens: float, seed: int, overrides: dict[str, Any],
                points: int) -> dict[str, Any]:
    """`train --model-size SHAPE --max-tokens N --seed S --save-every K --keep-checkpoints M`; each checkpoint
    (and final_model, for the last point) scored on the held-out documents."""
    from gpt2_dutch.data.tokenizer import load_tokenizer_dir
    from gpt2_dutch.train import TrainConfig, train

    cfg = TrainConfig(**{**overrides, "model_size": shape, "dataset_path": str(data["dataset"]),
                         "max_tokens": tokens, "seed": seed, "output_dir": str(data["root"] / f"ours-{seed}")})
    total, _ = planned_steps(cfg)
    steps = snapshot_steps(total, points)
    every = steps[0]
    # keep every checkpoint until scored; its own evaluations (of preprocess's test split) are not the curve's, so
    # one at the end instead of ten: they change nothing in training
    cfg = replace(cfg, save_every=every, keep_checkpoints=total // every + 1, eval_every=cfg.eval_every or total)
    with contextlib.redirect_stdout(sys.stderr):
        run = train(cfg)
    info, records = read_run_config(run), read_metrics(run)
    summary = next(r for r in records if metric_kind(r) == "summary")
    if summary["step"] != total:
        raise RuntimeError(f"bench quality: ours trained {summary['step']} steps, its plan said {total}")
    tokenizer = load_tokenizer_dir(data["dataset"])
    models = {}
    for step in steps[:-1]:
        model = run / "checkpoints" / f"checkpoint-{step}"
        tokenizer.save_pretrained(str(model))  # a checkpoint holds no tokenizer; evaluate loads one beside it
        models[step] = str(model)
    models[total] = str(run / "final_model")
    curve = _score_curve(models, info["tokens_per_step"], data["heldout_file"])
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # tiny's are ~250 MB each
    return {"steps": total, "tokens": total * info["tokens_per_step"], "parameters": info["parameters"],
            "train_seconds": summary["train_runtime"], "curve": curve,
            "final_bits_per_byte": curve[-1]["bits_per_byte"],
            "settings": {k: info[k] for k in SHOWN_SETTINGS if k in info}}


def _score_curve(models: dict[int, str], tokens_per_step: int, heldout: Path) -> list[dict[str, Any]]:
    curve = []
    for step, model in sorted(models.items()):
        curve.append({"step": step, "tokens": step * tokens_per_step, **_score(model, heldout)})
        _free_memory()
    return curve


def _peer_train(data: dict[str, Any], ours: dict[str, Any], lr: float, seed: int, name: str) -> dict[str, Any]:
    from gpt2_dutch.bench.baselines import peer_recipe
    from gpt2_dutch.model.presets import MODEL_PRESETS

    s = ours["settings"]
    p = MODEL_PRESETS[s["model_size"]]
    shape = {"n_layer": p.n_layer, "n_embd": p.n_embd, "n_head": p.n_head}
    with contextlib.redirect_stdout(sys.stderr):
        r = peer_recipe(str(data["dataset"]), shape, s["batch_size"], s["gradient_accumulation_steps"],
                        ours["steps"], lr, seed, str(data["root"] / name), [c["step"] for c in ours["curve"]])
    if r["tokens"] != ours["tokens"]:  # the same chunks per step and steps: anything else is no comparison
        raise RuntimeError(f"bench quality: the peer saw {r['tokens']} tokens, ours {ours['tokens']}")
    return {"learning_rate": lr, **r}


def _peer_curve(data: dict[str, Any], ours: dict[str, Any], lr: float, seed: int, name: str,
                trained: dict[str, Any] | None = None, final: dict[str, Any] | None = None) -> dict[str, Any]:
    """The peer's run (trained now unless given) with every snapshot scored (the final one reused if given)."""
    r = trained or _peer_train(data, ours, lr, seed, name)
    snapshots = r.pop("snapshots")
    last = max(snapshots)
    todo = {s: m for s, m in snapshots.items() if final is None or s != last}
    curve = _score_curve(todo, ours["settings"]["tokens_per_step"], data["heldout_file"])
    if final is not None:
        curve.append(final)
    shutil.rmtree(data["root"] / name, ignore_errors=True)
    return {**r, "curve": curve, "final_bits_per_byte": curve[-1]["bits_per_byte"]}


def _sweep(data: dict[str, Any], ours: dict[str, Any], lrs: list[float], seed: int) -> tuple[dict[str, Any], dict]:
    """Each learning rate's peer on `seed`, scored at its final step; the best one's whole curve."""
    finals, trained = [], []
    for lr in lrs:
        say(f"quality --shape, seed {seed}: the AdamW peer at lr {lr:g} (sweep of {len(lrs)})")
        r = _peer_train(data, ours, lr, seed, f"peer-{seed}-lr{lr:g}")
        last = max(r["snapshots"])
        finals.append({"step": last, "tokens": r["tokens"], **_score(r["snapshots"][last], data["heldout_file"])})
        trained.append(r)
        _free_memory()
    bpb = [f["bits_per_byte"] for f in finals]
    best = min(range(len(lrs)), key=lambda i: bpb[i] if math.isfinite(bpb[i]) else math.inf)
    for i, lr in enumerate(lrs):
        if i != best:
            shutil.rmtree(data["root"] / f"peer-{seed}-lr{lr:g}", ignore_errors=True)
    edge = len(lrs) > 1 and best in (0, len(lrs) - 1)
    if edge:
        say(f"warning: the peer's best learning rate {lrs[best]:g} is at the edge of --peer-lrs; widen it")
    sweep = {"seed": seed, "learning_rates": lrs, "final_bits_per_byte": bpb, "chosen": lrs[best],
             "at_edge": edge}
    peer = _peer_curve(data, ours, lrs[best], seed, f"peer-{seed}-lr{lrs[best]:g}", trained[best], finals[best])
    return sweep, peer
