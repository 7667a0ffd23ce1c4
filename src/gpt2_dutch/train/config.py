"""`TrainConfig`: every setting of a training run, its help text and its checks (no torch needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from gpt2_dutch.core.errors import check, check_number, check_seed
from gpt2_dutch.core.options import flag_name, option, parse_duration
from gpt2_dutch.model.presets import MODEL_PRESETS, preset
from gpt2_dutch.push import check_repo_id
from gpt2_dutch.runs.records import RECORD_FORMAT

# --embedding-lr-scale's default: the embedding tables train at 8x AdamW's rate, screened against x1 to x16 with
# both an own and a tied LM head (docs/experiments/optimizer.md).
EMBEDDING_LR_SCALE = 8.0

# AdamW's (beta1, beta2) by optimizer, where --adam-beta1/--adam-beta2 are not given. Beside Muon, AdamW trains only
# the embedding tables, the LM head, LayerNorms and biases; there less momentum and a longer second-moment memory
# trained better: a token's embedding row gets a gradient only in steps where the token occurs, and with beta2 0.95
# a rare token's second moment has decayed by its next occurrence (modded-nanogpt trains its embeddings and head
# with beta1 0.8 too). With --optimizer adamw (every matrix) the textbook GPT-3 values stay, not re-measured
# (docs/experiments/optimizer.md).
ADAM_BETAS = {"muon": (0.7, 0.99), "adamw": (0.9, 0.95)}
# --adamw-weight-decay's default: under Muon, AdamW's matrices (the embedding tables and the LM head) trained better
# without decay, and the gain is AdamW's side; Muon's matrices keep --weight-decay (Moonshot's Moonlight found
# Muon needs it at scale). modded-nanogpt's Adam parameters have none either (docs/experiments/optimizer.md).
MUON_ADAMW_WEIGHT_DECAY = 0.0
# Optimizer ideas from modded-nanogpt and nanochat (issue #25), each off by default until a two-seed ablation in
# both regimes keeps it (docs/experiments/ablations/). These act on Muon's matrices, so they need --optimizer muon;
# under --fsdp, which trains with AdamW, the plan turns them off (muon_options_off).
MUON_OPTIONS = ("muon_momentum_warmup", "muon_iteration", "normuon", "cautious_weight_decay")
# The settings a resumed run must be given as it was trained: the optimizer's state and param groups were built
# by them (optimizer.pt brings its param groups back whatever the flags say), and another value would change the
# update mid-run, so resuming is not exact. Runs from before an option resume as its default.
RESUMED_AS_TRAINED = (*MUON_OPTIONS, "ema_horizon")


@dataclass
class TrainConfig:
    # run_config.json says it is a run's record with this "format": `train --config RUN/run_config.json` then
    # takes its settings and ignores what the run recorded about itself (status, total_steps, ...)
    RECORD_FORMAT: ClassVar[str] = RECORD_FORMAT
    # a replay is a new run with the same settings: it never continues (or overwrites) the recorded one
    NOT_REPLAYED: ClassVar[tuple[str, ...]] = ("resume", "push_to_hub")  # nor overwrites what that run published

    dataset_path: str | None = option(None, "processed dataset directory (from `gpt2-dutch preprocess`)")
    model_size: str = option("small", f"GPT-2 shape: {', '.join(MODEL_PRESETS)}, or auto: the one closest to "
                             "compute-optimal (~20 tokens per parameter) for --max-time or --max-tokens, from the "
                             "speed measured here")
    tie_embeddings: bool = option(False, "tie the LM head to the token embedding, as GPT-2 did. By default the head "
                                  "has its own weight: as fast, and it learned more per step (see the README's "
                                  "quality section). A resumed run and --init-from keep their model's choice")
    epochs: float = option(1.0, "passes over the training split (ignored when a --max-* limit is given)")
    batch_size: int | None = option(None, "chunks per device per micro-batch (default: with --max-time or "
                                    "--max-tokens, chosen for the budget, see the README; else 8)")
    gradient_accumulation_steps: int | None = option(None, "micro-batches per optimizer step (default 1, or as "
                                                     "the budget's batch needs)")
    max_steps: int | None = option(None, "stop after this many optimizer steps")
    max_tokens: float | None = option(None, "stop after this many training tokens (e.g. 5e8)")
    max_time: str | None = option(None, "wall-clock budget for the training steps (e.g. 90s, 30m, 2h; evaluations "
                                  "and checkpoints come on top): speed is measured over the first steps, then the "
                                  "step count is fixed so the schedule ends properly")
    learning_rate: float | None = option(None, "peak learning rate (AdamW's; Muon's is 0.02). Default: with "
                                         "--max-time or --max-tokens, chosen for the budget (see the README); "
                                         "else per size: pico, nano and tiny 2e-3, small 6e-4, medium 3e-4, large "
                                         "2.5e-4, xl 2e-4")
    warmup: float = option(0.05, "linear warmup: a fraction of the run if < 1, else a number of steps")
    embedding_lr_scale: float | None = option(None, "AdamW learning rate of the token and position embedding tables "
                                              "as a multiple of --learning-rate (default 8: see the README's "
                                              "quality section; a resumed run keeps its own)")
    adam_beta1: float | None = option(None, "AdamW's beta1 (its momentum). Default: 0.7 under --optimizer muon "
                                      "(AdamW's parameters there: embeddings, LM head, LayerNorms, biases), 0.9 "
                                      "with adamw; a resumed run keeps its own")
    adam_beta2: float | None = option(None, "AdamW's beta2 (its second-moment decay). Default: 0.99 under "
                                      "--optimizer muon, 0.95 with adamw; a resumed run keeps its own")
    weight_decay: float = option(0.1, "weight decay on weight matrices (not biases or LayerNorms); under --optimizer "
                                 "muon on Muon's matrices (see --adamw-weight-decay for the others)")
    adamw_weight_decay: float | None = option(None, "under --optimizer muon: weight decay of the matrices AdamW "
                                              "trains there, the embedding tables and the LM head (default 0: "
                                              "see the README's quality section; a resumed run keeps its own). "
                                              "With --optimizer adamw, --weight-decay covers every matrix")
    schedule: str = option("wsd", "learning-rate schedule after warmup: wsd (stable at the peak, then linear to 0 "
                           "over the last --cooldown of the run) or cosine (to 10%% of the peak at the end)",
                           choices=["cosine", "wsd"])
    cooldown: float = option(0.2, "wsd: the fraction of the run over which the learning rate falls to 0")
    seed: int = option(42, "seed for weights, data order and everything random")
    output_dir: str = option("trained_models", "where runs are written")
    resume: str | None = option(None, "continue a run: without a value the newest unfinished run of --model-size "
                                "in --output-dir; 'auto' the same, or a new run when there is none (for jobs that "
                                "are requeued after preemption); or a run or checkpoint directory. A finished run "
                                "is continued only with a --max-steps beyond the step it reached",
                                nargs="?", const="latest")
    init_from: str | None = option(None, "start a new run from the weights of a model (a final_model, run or "
                                   "checkpoint directory; safetensors) instead of random ones")
    precision: str = option("auto", "auto: bf16 where supported (GPUs with bf16, CPUs with AVX512-BF16/AMX), "
                            "fp16 with loss scaling on older GPUs, else fp32",
                            choices=["auto", "bf16", "fp16", "fp32"])
    compile: bool = option(False, "torch.compile the model")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    eval_every: int | None = option(None, "evaluate every N steps (default: 10 times per run)")
    eval_chunks: int | None = option(None, "test chunks scored per evaluation (0: the whole test split; default: "
                                     "3%% of the run's training chunks, at least 16 and at most 1000, so that its "
                                     "ten evaluations cost about a tenth of the training time)")
    save_every: int | None = option(None, "checkpoint every N steps (default: 10 times per run)")
    keep_checkpoints: int = option(2, "keep the newest K checkpoints")
    log_every: int | None = option(None, "log train loss every N steps (default: ~100 times per run)")
    report_to: str = option("none", "experiment tracker", choices=["none", "tensorboard", "wandb", "trackio"])
    use_wandb: bool = option(False, "same as --report-to wandb", deprecated="--report-to wandb")
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state (FSDP) across GPUs: for large/xl")
    dataloader_workers: int = option(0, "DataLoader worker processes (the data is memory-mapped; 0 is usually "
                                     "enough)", aliases=["--num-workers"])
    quiet: bool = option(False, "no progress bar and no per-evaluation lines: only warnings, errors and the final "
                         "line (the records still go to metrics.jsonl and the trackers)")
    log_format: str = option("text", "text: a progress bar with the live figures and one line per evaluation; "
                             "json: one JSON object per log/eval record on stderr (the records of metrics.jsonl), "
                             "for clusters and scripts", choices=["text", "json"])
    optimizer: str = option("muon", "adamw: AdamW for every parameter; muon: Muon (orthogonalized Nesterov "
                            "momentum, lr 0.02 x sqrt(max(1, out/in)), Q, K and V as three matrices) for the "
                            "blocks' weight matrices and AdamW at --learning-rate for embeddings, LayerNorms and "
                            "biases (AdamW with --fsdp)", choices=["adamw", "muon"])
    muon_momentum_warmup: float = option(0.0, "under --optimizer muon: Muon's momentum rises linearly from 0.85 "
                                         "to 0.95 over this many first steps (a fraction of the run if < 1), as "
                                         "modded-nanogpt's does over 300; 0: 0.95 from the first step")
    muon_iteration: str = option("newton-schulz", "under --optimizer muon: how Muon orthogonalizes its momentum: "
                                 "newton-schulz (Keller Jordan's quintic, five steps) or polar-express (the Polar "
                                 "Express coefficients, one quintic per step, as modded-nanogpt and nanochat use: "
                                 "closer to orthogonal in the same five steps)",
                                 choices=["newton-schulz", "polar-express"])
    normuon: bool = option(False, "under --optimizer muon: NorMuon, each neuron's orthogonalized update divided by "
                           "the root of its own running mean square (beta2 0.9), the matrix's step keeping its size, "
                           "as in modded-nanogpt and nanochat")
    cautious_weight_decay: bool = option(False, "under --optimizer muon: Muon's matrices decay (--weight-decay) only "
                                         "where the step itself shrinks the weight (update and weight of one sign), "
                                         "as modded-nanogpt's and nanochat's")
    ema_horizon: float = option(0.0, "publish final_model from an exponential moving average of the weights over "
                                "about this many last steps (a fraction of the run if < 1; each step enters with "
                                "1/horizon of the average), kept in every checkpoint; its evaluation is the run's "
                                "last. 0: the last step's weights. Not with --fsdp")
    loss_chunk_tokens: int = option(2048, "compute the LM head and its cross-entropy this many tokens at a time, "
                                    "so the [batch, context, vocab] logits never exist whole (less memory, "
                                    "faster on CPU; on CUDA a fused kernel from liger-kernel or "
                                    "cut-cross-entropy when installed); 0: the model's own full-logits loss")
    license: str = option("apache-2.0", "the license the model card declares (a Hub license identifier: "
                          "apache-2.0, mit, cc-by-4.0, other, ...)")
    push_to_hub: str | None = option(None, "at the end of a successful run, publish final_model on the Hugging "
                                     "Face Hub as this repository (NAME or OWNER/NAME; see `gpt2-dutch push`); "
                                     "the token is checked before training starts")
    private: bool = option(False, "with --push-to-hub: create the repository as private",
                           aliases=["--hub-private"])

    # --max-time in seconds, derived in __post_init__; a field so that run_config.json records it
    max_time_s: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        check(self.dataset_path is not None, "--dataset-path is required (a directory made by `gpt2-dutch "
              "preprocess`)")
        if self.model_size == "auto":
            check(self.max_time is not None or self.max_tokens is not None, "--model-size auto needs a budget to "
                  "size the model for: give --max-time (e.g. 30m) or --max-tokens (e.g. 5e8), or pick a "
                  f"--model-size ({', '.join(MODEL_PRESETS)})")
        else:
            preset(self.model_size)
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "eval_every", "save_every",
                     "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive (got {value})")
        for name in ("epochs", "max_tokens", "learning_rate"):
            value = getattr(self, name)
            check_number(value, f"--{name.replace('_', '-')}")
            check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive (got {value})")
        check_number(self.warmup, "--warmup", minimum=0)
        check_number(self.weight_decay, "--weight-decay", minimum=0)
        check_number(self.cooldown, "--cooldown", minimum=0, exclusive_minimum=True, maximum=1)
        if self.embedding_lr_scale is not None:
            check_number(self.embedding_lr_scale, "--embedding-lr-scale", minimum=0, exclusive_minimum=True)
        check_number(self.adamw_weight_decay, "--adamw-weight-decay", minimum=0)
        check(self.adamw_weight_decay is None or self.optimizer == "muon", "--adamw-weight-decay is for --optimizer "
              "muon (with adamw, --weight-decay covers every matrix)")
        check_number(self.muon_momentum_warmup, "--muon-momentum-warmup", minimum=0)
        check_number(self.ema_horizon, "--ema-horizon", minimum=0)
        check(not (self.ema_horizon and self.fsdp), "--ema-horizon is not available with --fsdp (each GPU holds "
              "only a shard of the weights); leave one of them out")
        changed = [flag_name(n) for n in MUON_OPTIONS if getattr(self, n) != _default(n)]
        check(not changed or self.optimizer == "muon", f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} "
              "for --optimizer muon (it changes how Muon updates its matrices); leave it out with --optimizer adamw")
        for name in ("adam_beta1", "adam_beta2"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), f"--{name.replace('_', '-')}", minimum=0, maximum=1,
                             exclusive_maximum=True)
        check_seed(self.seed)
        check(self.eval_chunks is None or self.eval_chunks >= 0, "--eval-chunks must be >= 0")
        check(isinstance(self.loss_chunk_tokens, int) and self.loss_chunk_tokens >= 0, "--loss-chunk-tokens must "
              f"be a whole number >= 0 (0: the full-logits loss; got {self.loss_chunk_tokens})")
        check(0 <= self.dataloader_workers <= 256, f"--dataloader-workers must be between 0 and 256 (got "
              f"{self.dataloader_workers})")
        check(not (self.resume and self.init_from), "give --resume (continue a run) or --init-from (a new run "
              "from a model's weights), not both")
        check(re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", self.license or "") is not None, f"--license {self.license!r} "
              "is not a license identifier like apache-2.0, mit or cc-by-4.0 (https://huggingface.co/docs/hub/"
              "repositories-licenses)")
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub, "--push-to-hub")
        self.max_time_s = None if self.max_time is None else parse_duration(self.max_time)
        if self.use_wandb:
            self.report_to = "wandb"


def _default(name: str) -> Any:
    return next(f.default for f in fields(TrainConfig) if f.name == name)


def muon_options_off() -> dict[str, Any]:
    """MUON_OPTIONS at their defaults (off): what a run that trains with AdamW records for them."""
    return {name: _default(name) for name in MUON_OPTIONS}


def resume_conflicts(cfg: TrainConfig, recorded: dict[str, Any]) -> list[str]:
    """What `cfg` asks differently from the run's record `recorded` among RESUMED_AS_TRAINED, one phrase each."""
    problems = []
    for name in RESUMED_AS_TRAINED:
        was, asked = recorded.get(name, _default(name)), getattr(cfg, name)
        if was == asked:
            continue
        flag = flag_name(name)
        if isinstance(was, bool):
            problems.append(f"it was trained with {flag} (pass it)" if was else
                            f"it was trained without {flag} (leave it out)")
        else:
            problems.append(f"it was trained with {flag} {was:g} (pass that)" if isinstance(was, float) else
                            f"it was trained with {flag} {was} (pass that)")
    return problems
