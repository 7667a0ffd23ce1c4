"""`--optimizer muon`: Muon for GPT-2's hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) replaces each hidden matrix's update by its
momentum made orthogonal (all singular values ~1) with a Newton-Schulz iteration. Embeddings, the LM head (its own
weight, or the tied token embedding), LayerNorms and biases stay with AdamW at --learning-rate, with the betas
and the decay of its matrices that train.config chooses beside Muon (ADAM_BETAS, MUON_ADAMW_WEIGHT_DECAY).

Why one optimizer class of ours and not torch.optim.Muon (PyTorch >= 2.9) beside a torch.optim.AdamW:
- GPT-2's hidden matrices are transformers' `Conv1D`, whose weight is stored in x out, the transpose of
  `nn.Linear`. torch's Muon reads the shape as stored for its learning-rate adjustment (max(1, A/B)**0.5 with
  A, B = param.shape), so the MLP's c_fc (768x3072 stored) would get 1 instead of 2 and its c_proj 2 instead
  of 1. And `c_attn` holds Q, K and V side by side (768x2304 stored): three maps, to be orthogonalized as
  three matrices; torch's Muon orthogonalizes every parameter whole and cannot be told otherwise. So none of
  GPT-2's matrices is one torch's Muon handles right under its public API (its Newton-Schulz helper is private).
- The Trainer checkpoints one optimizer (one state_dict in optimizer.pt, restored for exact resume), the
  schedule is one LambdaLR over that optimizer's param groups, and the health guard wraps its `step`. One
  `torch.optim.Optimizer` with Muon groups and AdamW groups (as Keller Jordan's MuonWithAuxAdam) keeps all of
  that working unchanged; two optimizers would need their own checkpoint, resume and schedule plumbing.
So the Muon update is written here (the quintic is a few lines), and the AdamW groups run torch's own AdamW code
through its public functional form `torch.optim.adamw.adamw`, with the state laid out as torch.optim.AdamW's.

The learning-rate adjustment is Keller Jordan's ("original" in torch.optim.Muon): Muon's lr times
max(1, rows/cols)**0.5 with rows = outputs and cols = inputs (nn.Linear orientation), per Q/K/V block. Why this
and not "match_rms_adamw" (0.2 * sqrt(max(A, B)) times AdamW's lr): it scales the update's spectral norm with
sqrt(fan_out/fan_in), the condition under which a step changes a layer's outputs by the same amount at every
width, so one Muon lr (0.02, momentum 0.95, Nesterov: the published defaults) serves every preset without a
second column in the size table; match_rms_adamw exists to reuse an lr tuned for AdamW, which would tie Muon's
step to a table that was tuned for AdamW's.

Weight decay: a Muon matrix shrinks by AdamW's lr x --weight-decay per step, as it would under AdamW (and as
in Moonshot's Muon); torch's Muon multiplies --weight-decay by Muon's own lr, 0.02, which with 0.1 would pull
the matrices to zero ~33x faster than AdamW does at small's 6e-4. Done by giving the Muon groups
weight_decay = wd * adamw_lr / muon_lr: the schedule scales both lrs alike, so the ratio holds at every step.

Distributed: under DDP every rank holds whole matrices with all-reduced gradients and computes the same update.
Under FSDP a rank holds a flat shard of several matrices, not whole ones: `resolve_optimizer` falls back to
AdamW there, with a one-line notice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw as adamw_step  # torch.optim.AdamW's own code, public (in __all__)

OPTIMIZERS = ("adamw", "muon")
MUON_LR = 0.02
MUON_MOMENTUM = 0.95
# --muon-momentum-warmup starts here: less momentum while the gradients turn fast early on (modded-nanogpt,
# train_gpt.py get_muon_momentum: 0.85 -> 0.95 over 300 steps; nanochat, scripts/base_train.py: 0.85 -> 0.97 over 400)
MUON_MOMENTUM_START = 0.85

# Keller Jordan's quintic Newton-Schulz coefficients (https://kellerjordan.github.io/posts/muon/,
# github.com/KellerJordan/Muon muon.py; also torch.optim.Muon's defaults). They maximise the slope at zero, so
# five steps take every singular value of a normalised matrix into roughly [0.7, 1.2] rather than exactly 1,
# which trains as well as the exact orthogonal factor UV^T and costs a few matmuls instead of an SVD.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# --muon-iteration polar-express: Polar Express (Amsel, Persson, Musco, Gower, https://arxiv.org/abs/2505.16932)
# gives each of the five steps its own quintic, chosen for the singular values still left at that step, so the
# same five steps end closer to UV^T (every singular value in ~[0.85, 1.15] against the fixed quintic's ~[0.7,
# 1.2], tested). The numbers are the paper's for five steps with a safety factor of 2e-2, the coefficients
# modded-nanogpt's train_gpt.py and nanochat's nanochat/optim.py use; the input is divided by 1.02 x its Frobenius
# norm, the margin they were computed for (modded-nanogpt's normalisation).
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02
ITERATIONS = ("newton-schulz", "polar-express")
# --normuon: the decay of NorMuon's per-neuron second moment (Li et al., https://arxiv.org/abs/2510.05491), the
# beta2 that modded-nanogpt's train_gpt.py (NorMuonAndAdam) and nanochat's nanochat/optim.py (MuonAdamW) give it
NORMUON_BETA2 = 0.9
# On a CPU, bf16 Newton-Schulz pays from this smaller side up (2-4x faster at 256-768); below it the casts cost
# more than the matmuls save (pico's and nano's 64 and 128: 0.4-0.9x) (docs/experiments/optimizer.md).
CPU_BF16_NS_MIN_SIDE = 256


def resolve_optimizer(name: str, fsdp: bool) -> tuple[str, str | None]:
    """The optimizer a run really uses, and the notice to print when it is not the one asked for."""
    if name == "muon" and fsdp:
        return "adamw", ("notice: --optimizer muon is not available with --fsdp (each GPU holds only a shard of "
                         "every matrix, and Muon orthogonalizes whole matrices): training with AdamW")
    return name, None


def muon_momentum(step: int, warmup_steps: int) -> float:
    """Muon's momentum for the update of `step` (0: the first): linear from MUON_MOMENTUM_START to MUON_MOMENTUM
    over the first `warmup_steps`, MUON_MOMENTUM from there (and throughout when `warmup_steps` is 0)."""
    if step >= warmup_steps:
        return MUON_MOMENTUM
    return MUON_MOMENTUM_START + (MUON_MOMENTUM - MUON_MOMENTUM_START) * step / warmup_steps


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  dtype: torch.dtype | None = None, iteration: str = "newton-schulz") -> torch.Tensor:
    """~U V^T of each matrix in `g` (..., rows, cols), where U S V^T is its SVD: the quintic iteration of
    Keller Jordan's Muon (or, with `iteration` "polar-express", a quintic of its own per step), in `dtype`
    (default: bf16 on GPUs, as there: tensor cores, and the iteration tolerates it; fp32 elsewhere). MuonAdamW
    passes bf16 for a bf16 run on a CPU with bf16 matmul units too."""
    if iteration == "polar-express":
        assert steps <= len(POLAR_EXPRESS_COEFFICIENTS), steps
        coefficients, safety = POLAR_EXPRESS_COEFFICIENTS[:steps], POLAR_EXPRESS_SAFETY
    else:
        coefficients, safety = (NS_COEFFICIENTS,) * steps, 1.0
    x = g.to(dtype or (torch.bfloat16 if g.is_cuda else torch.float32))
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix x x^T is then the smaller one
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)  # Frobenius norm >= spectral norm: all s.v. <= 1
    if safety != 1.0:
        norm = norm * safety
    x = x / norm.clamp(min=eps)
    for a, b, c in coefficients:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def normuon_shape(weight: torch.Tensor, conv1d: bool, blocks: int) -> tuple[int, int, int]:
    """The shape of NorMuon's second moment for one weight: one value per row of each block (nn.Linear
    orientation, an output neuron) where the block is at least as tall as wide, else one per column, so that
    each value averages over the shorter side, as modded-nanogpt and nanochat reduce it."""
    rows, cols = (weight.shape[1], weight.shape[0]) if conv1d else tuple(weight.shape)
    per_block = rows // blocks
    return (blocks, per_block, 1) if per_block >= cols else (blocks, 1, cols)


def normalize_neurons(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon's step after orthogonalization, for `update` (blocks, rows, cols): the mean square of each row (or
    column: `second_moment`'s shape says which) enters an exponential average (`second_moment`, updated in
    place), each row is divided by that average's square root, and each block is rescaled to its Frobenius norm
    before this. Why: an orthogonalized update still gives some neurons far larger steps than others; this
    evens them out as Adam's second moment would, while the block's step keeps Muon's size."""
    axis = -1 if second_moment.size(-1) == 1 else -2
    second_moment.lerp_(update.float().square().mean(dim=axis, keepdim=True), 1 - beta2)
    scaled = update * second_moment.clamp(min=1e-10).rsqrt().to(update.dtype)
    size = update.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-10)
    return scaled * size


def orthogonal_update(momentum: torch.Tensor, conv1d: bool, blocks: int, dtype: torch.dtype | None = None,
                      iteration: str = "newton-schulz", second_moment: torch.Tensor | None = None,
                      beta2: float = NORMUON_BETA2) -> torch.Tensor:
    """Muon's update for one weight, in its stored layout, before the learning rate: each of the `blocks` output
    blocks orthogonalized on its own in nn.Linear orientation (out x in; a Conv1D weight is in x out), with a
    `second_moment` (normuon_shape) NorMuon's per-neuron normalization after it (normalize_neurons), and
    scaled by max(1, out/in)**0.5 of that block; the iteration (`iteration`, in `dtype`: see newton_schulz).

    One weight at a time: stacking the same layer of every block into one batched iteration was no faster on a
    CPU, whose matmuls of GPT-2's sizes are already large (docs/experiments/optimizer.md)."""
    w = momentum.mT if conv1d else momentum
    rows, cols = w.shape
    per_block = rows // blocks
    if dtype == torch.bfloat16 and not momentum.is_cuda and min(per_block, cols) < CPU_BF16_NS_MIN_SIDE:
        dtype = torch.float32  # on a CPU, small matrices iterate faster in fp32
    update = newton_schulz(w.reshape(blocks, per_block, cols), dtype=dtype, iteration=iteration).to(momentum.dtype)
    if second_moment is not None:
        update = normalize_neurons(update, second_moment, beta2)
    update = (update * max(1.0, per_block / cols) ** 0.5).reshape(rows, cols)
    return update.mT if conv1d else update


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, muon_lr: float = MUON_LR,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 decay_names: Iterable[str] | None = None, adamw_weight_decay: float | None = None,
                 iteration: str = "newton-schulz", normuon_beta2: float = 0.0,
                 cautious_weight_decay: bool = False) -> list[dict[str, Any]]:
    """MuonAdamW's param groups for a GPT-2 model: the weights of the blocks' Conv1D/Linear layers (c_attn as Q,
    K and V; cross-attention's c_attn as K and V) to Muon with `weight_decay`, the orthogonalizing `iteration`
    and NorMuon's second moment decaying by `normuon_beta2` (0: no NorMuon), the decay only where the update
    shrinks the weight with `cautious_weight_decay`, every other parameter to AdamW at
    `lr`, with weight decay `adamw_weight_decay` (default: `weight_decay`) on the names in `decay_names` (the
    Trainer's choice: not biases or LayerNorms; default: >= 2-D): the embedding tables and the LM head.

    The AdamW group with decay comes first: the Trainer logs the first group's lr as the run's lr."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = output.weight if output is not None else None  # tied to wte or its own: AdamW's, as the embeddings
    qkv = {id(m.c_attn.weight): 2 if m.is_cross_attention else 3
           for m in model.modules() if isinstance(m, GPT2Attention)}
    muon: dict[tuple[bool, int], list[torch.nn.Parameter]] = {}
    for module in model.modules():
        if (isinstance(module, Conv1D | torch.nn.Linear) and module.weight is not head and module.weight.ndim == 2
                and module.weight.requires_grad):
            key = (isinstance(module, Conv1D), qkv.get(id(module.weight), 1))
            muon.setdefault(key, []).append(module.weight)
    in_muon = {id(p) for ps in muon.values() for p in ps}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_muon]
    decay = set(decay_names) if decay_names is not None else {n for n, p in named if p.ndim >= 2}
    adamw = {"use_muon": False, "lr": lr, "betas": betas, "eps": eps}
    adamw_decay = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    groups = [{**adamw, "params": [p for n, p in named if n in decay], "weight_decay": adamw_decay},
              {**adamw, "params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    for (conv1d, blocks), params in sorted(muon.items()):
        groups.append({"use_muon": True, "params": params, "lr": muon_lr, "momentum": MUON_MOMENTUM,
                       "nesterov": True, "layout": "conv1d" if conv1d else "linear", "blocks": blocks,
                       "iteration": iteration, "normuon_beta2": normuon_beta2,
                       "cautious_weight_decay": cautious_weight_decay,
                       "weight_decay": weight_decay * lr / muon_lr})  # shrinks by lr * wd per step, as AdamW
    return [g for g in groups if g["params"]]


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group ((0, 1) outside torch.distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two kinds of param groups (see `param_groups`): `use_muon` groups get Muon (Nesterov
    momentum, orthogonalized per block in nn.Linear orientation, decoupled weight decay), the others AdamW.
    One state_dict, so the Trainer's checkpoints and exact resume work unchanged; the schedule's LambdaLR scales
    every group's lr."""

    def __init__(self, groups: list[dict[str, Any]], ns_dtype: torch.dtype | None = None,
                 split_across_ranks: bool = False):
        """`ns_dtype`: the Newton-Schulz iteration's dtype (None: newton_schulz's default).
        `split_across_ranks`: under DDP (every rank holds the same gradients and state), each rank orthogonalizes
        every world-th matrix and broadcasts its update to the others, so the iteration's work is divided
        instead of repeated (modded-nanogpt splits it so too). The update is the one a single rank computes:
        the same inputs and the same code on the rank that owns it."""
        for g in groups:
            if g.get("use_muon"):
                bad = [tuple(p.shape) for p in g["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon takes 2-D weights only, got {bad}")
        super().__init__(groups, {"use_muon": False, "weight_decay": 0.0})
        self.ns_dtype = ns_dtype
        self.split_across_ranks = split_across_ranks

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict[str, Any]) -> None:
        lr, momentum, conv1d = group["lr"], group["momentum"], group["layout"] == "conv1d"
        beta2 = group.get("normuon_beta2", 0.0)  # param groups saved before the option have none
        rank, world = _rank_and_world() if self.split_across_ranks else (0, 1)
        params = [p for p in group["params"] if p.grad is not None]
        updates, sent = [], []
        for i, p in enumerate(params):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)  # on every rank: the state stays the same everywhere
            if beta2 and "second_moment" not in state:
                state["second_moment"] = torch.zeros(normuon_shape(p, conv1d, group["blocks"]), device=p.device)
            owner = i % world
            if owner == rank:
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                orthogonal = orthogonal_update(update, conv1d, group["blocks"], self.ns_dtype,
                                               group.get("iteration", "newton-schulz"),
                                               state["second_moment"] if beta2 else None, beta2)
            else:
                orthogonal = torch.empty_like(p)
            if world > 1:
                shared = [orthogonal, state["second_moment"]] if beta2 else [orthogonal]
                sent += [torch.distributed.broadcast(t, src=owner, async_op=True) for t in shared]
            updates.append(orthogonal)
        for work in sent:
            work.wait()
        for p, orthogonal in zip(params, updates, strict=True):
            if group.get("cautious_weight_decay"):
                # decay only where the step itself shrinks the weight (update and weight of one sign): decay
                # elsewhere pulls against what the gradient asks for (cautious weight decay: modded-nanogpt's
                # train_gpt.py and nanochat's nanochat/optim.py mask with update * weight >= 0)
                p.sub_(p * (orthogonal * p >= 0), alpha=lr * group["weight_decay"])
            else:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(orthogonal, alpha=-lr)

    def _adamw(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # the layout of torch.optim.AdamW's state (step on the CPU, not capturable)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adamw_step(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2,
                       lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
