"""train/loss.py: the LM head's cross-entropy without full logits equals GPT-2's own loss (value and gradients),
in training through the Trainer, under DDP, and with a fused CUDA library's API; the saved model stays plain."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_one_line_error
from safetensors.torch import load_file

from gpt2_dutch.train import train
from gpt2_dutch.train.loss import chunked_linear_cross_entropy, compute_dtype, fused_cuda_loss, lm_head_loss_sum

VOCAB, EOS = 512, 0


def tiny_model(seed: int = 0):  # noqa: ANN201 - a GPT2LMHeadModel
    from transformers import AutoModelForCausalLM

    from gpt2_dutch.model.presets import gpt2_config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(gpt2_config("tiny", VOCAB, 32, EOS), attn_implementation="sdpa")


def batch(seed: int = 1, rows: int = 3, context: int = 24) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (rows, context), generator=torch.Generator().manual_seed(seed))
    ids[:, ::7] = EOS  # <|endoftext|> is a target like every other token
    return ids


def chunked_mean(model, ids: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:  # noqa: ANN001
    """What GPT2Trainer.compute_loss does: the hidden states through the model's forward, then loss.py."""
    out = model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
    total = lm_head_loss_sum(out.hidden_states[-1], model.lm_head.weight, labels, chunk)
    return total / (labels[:, 1:] != -100).sum()


def grads(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return g


@pytest.mark.parametrize("chunk", [5, 10, 23, 4096], ids=["small", "uneven", "divides", "one-chunk"])
def test_loss_and_gradients_equal_the_full_logits_path_in_fp32(chunk):
    model = tiny_model()
    ids = batch()
    labels = ids.clone()
    labels[1, 5:9] = -100  # ignored targets (the Trainer's convention) give neither loss nor gradient
    plain = model(input_ids=ids, labels=labels).loss
    plain.backward()
    expected = grads(model)
    mine = chunked_mean(model, ids, labels, chunk)
    mine.backward()
    got = grads(model)
    assert mine.dtype == torch.float32
    assert abs(mine.item() - plain.item()) < 1e-5
    for name, g in expected.items():
        assert torch.allclose(got[name], g, atol=1e-5, rtol=1e-4), name
    with torch.no_grad():  # evaluation: no gradient work, the same loss
        assert abs(chunked_mean(model, ids, labels, chunk).item() - plain.item()) < 1e-5


def test_bf16_autocast_matches_the_plain_path_within_bf16_rounding():
    model = tiny_model()
    ids = batch(rows=4, context=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(ids.device) == torch.bfloat16
        plain = model(input_ids=ids, labels=ids).loss
    plain.backward()
    expected = grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = chunked_mean(model, ids, ids, 40)
    mine.backward()
    got = grads(model)
    assert compute_dtype(ids.device) is None  # autocast off again
    assert abs(mine.item() - plain.item()) < 2e-3
    for name, g in expected.items():
        cos = torch.nn.functional.cosine_similarity(got[name].flatten(), g.flatten(), dim=0)
        assert got[name].dtype == torch.float32 and cos > 0.999, (name, cos)


# block: logits per elementwise block, 50 per row: one row, 3 rows (uneven in a chunk of 6), the whole chunk
@pytest.mark.parametrize("block", [50, 150, 1 << 22], ids=["one-row", "three-rows", "whole-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_function_matches_cross_entropy_on_raw_tensors(block, dtype):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    t[[4, 11, 12]] = -100  # ignored: no loss, no gradient
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        # the reference sees the operands as the chunked path's matmuls do (rounded to the compute dtype)
        logits = (h.to(dtype) @ w.to(dtype).t()).float()
        ref = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
        ref_h, ref_w = torch.autograd.grad(ref, (h, w))
        mine = chunked_linear_cross_entropy(h, w, t, 6, block_logits=block)
    if dtype == torch.bfloat16:  # dL/dlogits rounded to bf16 once, as the plain path under autocast
        (2 * mine).backward()
        assert torch.allclose(mine, ref, rtol=1e-5)
        assert torch.allclose(h.grad, 2 * ref_h, atol=1e-6)
        # dL/dW: ours sums the chunks' products in fp32, the reference in one bf16 matmul (its rounding, ~0.4%)
        assert torch.allclose(w.grad, 2 * ref_w, rtol=1e-2, atol=1e-2)
        return
    (2 * mine).backward()  # backward scales the stored gradients by the incoming one
    assert torch.allclose(mine, ref, atol=1e-4)
    assert torch.allclose(h.grad, 2 * ref_h, atol=1e-5) and torch.allclose(w.grad, 2 * ref_w, atol=1e-5)


# gap: the target's logit below the best one, in nats: 60 (p ~1e-26, read off the softmax), 80 (p ~1e-35, below
# FP32_TINY: recomputed from the row's logits) and 300 (p underflows to 0 in fp32)
@pytest.mark.parametrize("gap", [60.0, 80.0, 300.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_target_far_below_the_best_logit_keeps_an_exact_finite_loss(dtype, gap):
    """The loss is -log p(target) from the softmax; where p is too small for fp32 (it underflows to 0 ~104 nats
    down, and -log 0 is inf) the row's loss is recomputed from its logits. An ignored row that far down adds
    nothing."""
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]], requires_grad=True)
    w = torch.tensor([[gap / 2, 0.0], [-gap / 2, 0.0], [0.0, 3.0]], requires_grad=True)
    t = torch.tensor([1, 2, 0, -100])  # the first row's target is `gap` below its best logit; the last is ignored
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = (h.to(dtype) @ w.to(dtype).t()).float()
        ref = torch.nn.functional.cross_entropy(logits, t, reduction="none")
        mine = chunked_linear_cross_entropy(h, w, t, 2)
    assert ref[0] > gap - 1 and torch.isfinite(mine)
    assert torch.allclose(mine, ref.sum(), rtol=1e-6)
    mine.backward()
    # the first row's gradient is exact too: softmax (1, 0, 0) minus the one-hot of token 1; none for the last
    assert torch.allclose(h.grad[0], w.detach()[0] - w.detach()[1], rtol=1e-2)
    assert torch.equal(h.grad[3], torch.zeros(2))


def test_cpu_logits_reuse_one_buffer_across_chunks_and_calls_without_stale_values():
    """The chunk's logits go into one reused CPU buffer (a fresh 128 MiB tensor per chunk cost page faults:
    see the module doc); a later call with other shapes and values still gives exactly the reference."""
    from gpt2_dutch.train.loss import logits_buffer

    first = logits_buffer(6, 50, torch.float32, torch.device("cpu"))
    again = logits_buffer(4, 50, torch.float32, torch.device("cpu"))
    assert again.shape == (4, 50) and again.data_ptr() == first.data_ptr()
    grown = logits_buffer(600, 50, torch.float32, torch.device("cpu"))
    assert grown.shape == (600, 50) and grown.is_contiguous()
    assert logits_buffer(2, 50, torch.float32, torch.device("cpu")).data_ptr() == grown.data_ptr()
    bf16 = logits_buffer(2, 50, torch.bfloat16, torch.device("cpu"))  # one per dtype
    assert bf16.dtype == torch.bfloat16 and bf16.data_ptr() != grown.data_ptr()
    # in another thread: its own buffer (two threads computing a loss must not share one)
    import threading

    other: list[int] = []
    worker = threading.Thread(target=lambda: other.append(
        logits_buffer(2, 50, torch.float32, torch.device("cpu")).data_ptr()))
    worker.start()
    worker.join()
    assert other[0] != grown.data_ptr()

    g = torch.Generator().manual_seed(5)
    for rows, vocab, chunk in [(37, 50, 6), (9, 70, 9), (37, 50, 4)]:  # larger, then smaller buffers reused
        h = torch.randn(rows, 8, generator=g)
        w = torch.randn(vocab, 8, generator=g)
        t = torch.randint(0, vocab, (rows,), generator=g)
        ref = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
        assert torch.allclose(chunked_linear_cross_entropy(h, w, t, chunk), ref, atol=1e-4)


def test_a_fused_cuda_library_is_called_with_its_own_argument_order(monkeypatch):
    """Liger's loss module takes (weight, hidden, target); cut-cross-entropy's function (hidden, weight, target).
    Faked here (no GPU, neither library installed): what the CUDA path would call, and with what."""
    calls = []

    class FakeLiger:
        def __init__(self, ignore_index: int, reduction: str):
            assert (ignore_index, reduction) == (-100, "sum")

        def __call__(self, weight, hidden, target):  # noqa: ANN001
            calls.append("liger")
            return torch.nn.functional.cross_entropy(hidden @ weight.t(), target, reduction="sum")

    def fake_cce(hidden, weight, target, ignore_index, reduction):  # noqa: ANN001
        calls.append("cce")
        return torch.nn.functional.cross_entropy(hidden @ weight.t(), target, reduction=reduction)

    h, w, t = torch.randn(5, 4), torch.randn(9, 4), torch.randint(0, 9, (5,))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
    liger = types.ModuleType("liger_kernel.transformers")
    liger.LigerFusedLinearCrossEntropyLoss = FakeLiger  # type: ignore[attr-defined]
    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = fake_cce  # type: ignore[attr-defined]
    for present in ({"liger_kernel": types.ModuleType("liger_kernel"), "liger_kernel.transformers": liger,
                     "cut_cross_entropy": cce},
                    {"liger_kernel": None, "liger_kernel.transformers": None, "cut_cross_entropy": cce},
                    {"liger_kernel": None, "liger_kernel.transformers": None, "cut_cross_entropy": None}):
        for name, module in present.items():
            monkeypatch.setitem(sys.modules, name, module)
        fused_cuda_loss.cache_clear()
        found = fused_cuda_loss()
        if present["cut_cross_entropy"] is None:
            assert found is None  # nothing importable: the chunked path
        else:
            assert torch.allclose(found[1](h, w, t), ref)
    assert calls == ["liger", "cce"]
    fused_cuda_loss.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True], ids=["own-head", "tied-head"])
def test_training_with_chunks_equals_full_logits_and_saves_a_plain_model(tie, tiny_dataset, tmp_path):
    """Through the Trainer (gradient accumulation: the loss is normalised over the step's tokens), 3 steps in
    fp32: the same logged losses and weights as the full-logits path; final_model is a plain GPT2LMHeadModel
    whose logits equal those of the checkpoint's weights."""
    import json

    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    from gpt2_dutch.train import TrainConfig

    def run(out: Path, chunk: int) -> Path:
        return train(TrainConfig(dataset_path=str(tiny_dataset), model_size="tiny", batch_size=2,
                                 gradient_accumulation_steps=2, precision="fp32", output_dir=str(out), max_steps=3,
                                 eval_every=3, save_every=3, log_every=1, loss_chunk_tokens=chunk,
                                 tie_embeddings=tie, embedding_lr_scale=1.0))  # 1x: see the 1e-4 below

    def losses(r: Path, key: str) -> list[float]:
        rows = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
        return [row[key] for row in rows if key in row]

    plain, chunked = run(tmp_path / "plain", 0), run(tmp_path / "chunked", 24)  # 2 x 31 targets: 3 chunks
    assert json.loads((chunked / "run_config.json").read_text())["loss_chunk_tokens"] == 24
    assert losses(chunked, "loss") == pytest.approx(losses(plain, "loss"), abs=1e-4)
    assert losses(chunked, "eval_loss") == pytest.approx(losses(plain, "eval_loss"), abs=1e-4)
    a, b = load_file(plain / "final_model" / "model.safetensors"), load_file(chunked / "final_model" /
                                                                             "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # 1e-4, not 1e-5: Adam divides by sqrt(v), so weights whose gradient is ~0 move by up to lr per
        # step on a rounding-level difference (one element of 0.8M moved 2.8e-5 here; with the tables at 8x their
        # rows would move 8x as far); the rest agree to ~1e-6
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    model = AutoModelForCausalLM.from_pretrained(chunked / "final_model").eval()
    assert type(model) is GPT2LMHeadModel and (model.lm_head.weight is model.transformer.wte.weight) is tie
    ref = AutoModelForCausalLM.from_pretrained(chunked / "checkpoints" / "checkpoint-3").eval()
    ids = torch.tensor([[5, 17, 42, 99, 0, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", None)])
def test_the_trainer_runs_the_head_in_the_runs_mixed_precision(precision, dtype, tiny_dataset, tmp_path,
                                                               monkeypatch):
    """accelerate puts only the model's forward under autocast: the chunked head must run under it too (it ran in
    fp32 under bf16 training, at half the speed), as the plain path's lm_head does inside the forward."""
    import gpt2_dutch.train.loss as loss_module
    from gpt2_dutch.train import TrainConfig

    seen, real = [], loss_module.compute_dtype
    monkeypatch.setattr(loss_module, "compute_dtype", lambda device: seen.append(real(device)) or seen[-1])
    train(TrainConfig(dataset_path=str(tiny_dataset), model_size="nano", batch_size=2, precision=precision,
                      output_dir=str(tmp_path), max_steps=2, eval_every=2, save_every=2, loss_chunk_tokens=24))
    assert seen and set(seen) == {dtype}  # training and evaluation steps alike


DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    sys.path[:0] = sys.argv[1:3]  # this file's folder, and tests/ for the helpers it imports
    from test_loss import batch, chunked_mean, tiny_model
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    model = tiny_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids = batch(rows=4)
    mine = ids[2 * rank: 2 * rank + 2]
    # through the DDP wrapper's forward, the head's weight from the inner model, as GPT2Trainer.compute_loss
    out = ddp(input_ids=mine, logits_to_keep=1, output_hidden_states=True)
    from gpt2_dutch.train.loss import lm_head_loss_sum
    loss = lm_head_loss_sum(out.hidden_states[-1], model.lm_head.weight, mine, 7) / mine[:, 1:].numel()
    loss.backward()  # DDP averages the two ranks' gradients: the full batch's mean-loss gradient
    if rank == 0:
        ref = tiny_model()
        ref(input_ids=ids, labels=ids).loss.backward()
        worst = max((p.grad - q.grad).abs().max().item()
                    for p, q in zip(model.parameters(), ref.parameters(), strict=True))
        print("WORST", worst)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_process_ddp_synchronises_the_head_gradient(tmp_path):
    """Two gloo ranks, half the batch each, the loss computed outside the wrapped forward: after backward every
    gradient (the tied embedding/head included) is the full batch's, as one process computes it."""
    script = tmp_path / "ddp_loss.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(Path(__file__).parent), str(REPO / "tests")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    worst = float(r.stdout.split("WORST")[1].split()[0])
    assert worst < 1e-5


@pytest.mark.parametrize(("value", "message"), [("-1", "--loss-chunk-tokens must be a whole number >= 0"),
                                                ("many", "invalid int value: 'many'")], ids=["negative", "not-int"])
def test_bad_loss_chunk_tokens_is_one_line(value, message, tiny_dataset, tmp_path, cli):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, "--max-steps", "1", "--output-dir", tmp_path,
                     "--loss-chunk-tokens", value)
    assert_one_line_error(rc, err, message)
