"""generate and evaluate on a tiny model that has memorised the test documents."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DOCS, assert_one_line_error, write_jsonl

from gpt2_dutch.evaluate import EvaluateConfig, evaluate
from gpt2_dutch.generate import GenerateConfig
from gpt2_dutch.generate.sampling import generate_texts
from gpt2_dutch.model.loading import load_model
from gpt2_dutch.train import TrainConfig, train

# Every test here needs `tiny_run`, a model trained for 300 steps until it knows the corpus by heart (its
# continuations are asserted), which takes longer than the whole fast suite may; test_fault_matrix.py,
# on random models, is the fast part for generate and evaluate.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(TrainConfig(dataset_path=str(tiny_dataset), model_size="tiny", batch_size=4, precision="fp32",
                             output_dir=str(out), max_steps=300, learning_rate=3e-3, eval_every=300,
                             save_every=300))


@pytest.fixture(scope="session")
def loaded(tiny_run):
    return load_model(tiny_run, device="cpu", dtype="fp32")


def test_model_path_accepts_run_dir_final_model_and_latest_link(tiny_run):
    for path in (tiny_run, tiny_run / "final_model", tiny_run.parent / "gpt2-dutch-tiny-latest"):
        assert load_model(path, "cpu", "fp32")[2] == tiny_run / "final_model" or \
            load_model(path, "cpu", "fp32")[2].resolve() == (tiny_run / "final_model").resolve()


def test_seeded_sampling_is_reproducible(loaded):
    model, tok, _ = loaded
    cfg = GenerateConfig(max_new_tokens=12, seed=7, temperature=1.5, top_k=0, top_p=1.0)
    a = generate_texts(model, tok, ["De trein"], cfg)
    b = generate_texts(model, tok, ["De trein"], cfg)
    assert a == b
    cfg.seed, cfg.temperature = 8, 5.0  # another seed, nearly uniform: 12 tokens never come out the same (at 1.5
    # this tiny model, which knows its 12 training sentences by heart, drew the same text with seeds 7 and 8)
    assert generate_texts(model, tok, ["De trein"], cfg) != generate_texts(model, tok, ["De trein"],
                                                                           replace(cfg, seed=7))
    cfg.num_return_sequences = 3
    cfg.seed = 7
    many = generate_texts(model, tok, ["De trein", "Het"], cfg)
    assert [len(x) for x in many] == [3, 3]


def test_cpu_decode_attention_equals_sdpa(loaded):
    """The one-query decoding path gives SDPA's result, padding mask included; longer queries are SDPA itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from gpt2_dutch.model.cpu_kernels import CPU_ATTENTION, cpu_decode_attention

    model = loaded[0]
    assert model.config._attn_implementation == CPU_ATTENTION
    module = model.transformer.h[0].attn
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 32), torch.randn(3, 4, 9, 32), torch.randn(3, 4, 9, 32)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    for m in (mask, None):
        ours, _ = cpu_decode_attention(module, q, k, v, m, scaling=0.125)
        ref, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.125)
        assert ours.shape == ref.shape == (3, 1, 4, 32) and torch.allclose(ours, ref, atol=1e-5)
    prompt = torch.randn(3, 4, 9, 32)
    ours, _ = cpu_decode_attention(module, prompt, k, v, None, scaling=0.125, is_causal=True)
    assert torch.equal(ours, sdpa_attention_forward(module, prompt, k, v, None, scaling=0.125, is_causal=True)[0])


def test_models_saved_with_gelu_new_load_with_the_fused_gelu_and_same_logits(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2_dutch.model.presets import FAST_GELU

    final = tiny_run / "final_model"
    old = AutoModelForCausalLM.from_pretrained(str(final), activation_function="gelu_new").eval()
    old.save_pretrained(str(tmp_path))
    AutoTokenizer.from_pretrained(str(final)).save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_new"
    model, tok, _ = load_model(tmp_path, device="cpu", dtype="fp32")
    assert model.config.activation_function == FAST_GELU
    ids = tok(["De trein naar Utrecht vertrekt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, old(ids).logits, atol=1e-5)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16")
def test_cpu_bf16_packs_every_linear_layer_with_the_same_logits(tiny_run):
    from transformers import AutoModelForCausalLM

    from gpt2_dutch.model.cpu_kernels import PackedLinear, parameter_count

    model, tok, _ = load_model(tiny_run, device="cpu", dtype="bf16")
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * model.config.n_layer + 1  # attention in/out, MLP in/out per block + the LM head
    # an LM head tied to the token embedding is counted there, not again (train's default head is its own)
    assert [m.counted for m in packed].count(False) == int(model.config.tie_word_embeddings)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_run / "final_model"), dtype=torch.bfloat16).eval()
    assert parameter_count(model) == sum(p.numel() for p in plain.parameters())
    assert not any(isinstance(m, PackedLinear) for m in load_model(tiny_run, "cpu", "fp32")[0].modules())
    enc = tok([d[:25] for d in DOCS[:3]], return_tensors="pt", padding=True)  # within the 32-token context
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, plain(**enc).logits)


@pytest.mark.parametrize("failure", ["wrong results", "op error"])
def test_packing_that_fails_its_check_keeps_the_plain_model(tiny_run, monkeypatch, failure):
    from gpt2_dutch.model.presets import cpu_kernels

    def broken(self, x):
        if failure == "op error":
            raise RuntimeError("mkldnn::_linear_pointwise: no such signature")
        return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype)

    monkeypatch.setattr(cpu_kernels.PackedLinear, "forward", broken)
    model, tok, _ = load_model(tiny_run, device="cpu", dtype="bf16")
    assert not any(isinstance(m, cpu_kernels.PackedLinear) for m in model.modules())
    assert generate_texts(model, tok, ["De trein"], GenerateConfig(max_new_tokens=4, greedy=True))[0][0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_greedy_batch_equals_one_by_one(tiny_run, dtype):
    model, tok, _ = load_model(tiny_run, device="cpu", dtype=dtype)
    cfg = GenerateConfig(max_new_tokens=12, greedy=True)
    prompts = ["De trein naar", "Oma bakt elke", "Het", "Kinderen leren op school"]  # all fit 12 new tokens
    batch = generate_texts(model, tok, prompts, cfg)
    single = [generate_texts(model, tok, [p], cfg)[0] for p in prompts]
    assert batch == single


def test_generation_stops_at_end_of_text(loaded):
    model, tok, _ = loaded
    doc = DOCS[10]  # memorised: greedy decoding finishes the document and then emits <|endoftext|>
    prompt = "Rembrandt en"
    ids = tok(prompt, return_tensors="pt")
    room = 32 - ids["input_ids"].shape[1]
    cfg = GenerateConfig(max_new_tokens=room, greedy=True)
    completion = generate_texts(model, tok, [prompt], cfg)[0][0]
    assert doc.endswith(prompt + completion) and completion == " Van Gogh."
    out = model.generate(**ids, max_new_tokens=room, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    assert out[0, -1].item() == tok.eos_token_id and out.shape[1] < 32


def test_each_prompt_gets_its_own_budget_in_a_batch(loaded, monkeypatch):
    """A long prompt no longer shortens the others: before, every prompt got context minus the longest prompt."""
    from gpt2_dutch.generate.sampling import plan_prompts

    model, tok, _ = loaded
    short, long = "De trein naar", DOCS[0][:33]  # the long one leaves fewer than 12 of the 32 positions
    n_long = len(tok(long)["input_ids"])
    assert 32 - n_long < 12
    cfg = GenerateConfig(max_new_tokens=12, greedy=True)
    plans = plan_prompts(tok, [short, long], 32, 12)
    assert [p.max_new_tokens for p in plans] == [12, 32 - n_long] and [p.dropped for p in plans] == [0, 0]
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["max_new_tokens"]) or original(**kw))
    batch = generate_texts(model, tok, [short, long, "Oma bakt elke"], cfg)
    assert sorted(calls) == [32 - n_long, 12]  # the capped prompt runs apart; the two that fit share one batch
    assert batch[0] == generate_texts(model, tok, [short], cfg)[0] == [" Utrecht vertrekt"]
    assert len(tok(batch[0][0])["input_ids"]) == 12  # 12 new tokens, not the long prompt's 32 - n_long
    assert batch[1] == generate_texts(model, tok, [long], cfg)[0]
    assert long + batch[1][0] == DOCS[0][:len(long + batch[1][0])]  # memorised: its capped continuation
    calls.clear()
    generate_texts(model, tok, [short, "Oma bakt elke", "Het"], cfg)
    assert calls == [12]  # the common case, every prompt fits: one batch


def test_cli_says_what_it_capped_and_truncated_and_json_has_it_per_prompt(tiny_run, loaded, cli):
    tok = loaded[1]
    short, long, too_long = "De trein naar", DOCS[0][:33], " ".join(DOCS[:2])
    n_long, n_too_long = len(tok(long)["input_ids"]), len(tok(too_long)["input_ids"])
    rc, out, err = cli("generate", "--model-path", tiny_run, "--precision", "fp32", "--greedy", "--json",
                       "--max-new-tokens", "12", "--prompt", short, "--prompt", long, "--prompt", too_long)
    assert rc == 0, err
    result = json.loads(out)
    assert [(r["prompt_tokens"], r["dropped_tokens"], r["max_new_tokens"]) for r in result] == [
        (len(tok(short)["input_ids"]), 0, 12), (n_long, 0, 32 - n_long), (n_too_long, n_too_long - 31, 1)]
    assert result[0]["completions"] == [" Utrecht vertrekt"]
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == [
        f"gpt2-dutch generate: note: prompt 2 ({n_long} tokens) gets {32 - n_long} new tokens, not 12 "
        "(--max-new-tokens): the model's context is 32 tokens",
        f"gpt2-dutch generate: note: prompt 3 ({n_too_long} tokens) is longer than the model's 32-token context: "
        f"its first {n_too_long - 31} tokens were dropped, its last 31 kept; it gets 1 new token, not 12 "
        "(--max-new-tokens)"]
    rc, out, err = cli("generate", "--model-path", tiny_run, "--precision", "fp32", "--greedy", "--max-new-tokens",
                       "12", "--prompt", short)
    assert rc == 0 and "note:" not in err and ">>> De trein naar Utrecht vertrekt\n" in out


def test_repl_notices_and_undecodable_lines_go_to_stderr_and_it_goes_on(loaded):
    import io

    from gpt2_dutch.generate.repl import repl

    model, tok, _ = loaded
    stdin = io.TextIOWrapper(io.BytesIO(b"/max 12\nDe \xffx\nDe trein naar\n" + DOCS[0][:33].encode() + b"\n"))
    stdout, stderr = io.StringIO(), io.StringIO()
    assert repl(model, tok, GenerateConfig(greedy=True), stdin, stdout, stderr) == 0
    assert "De trein naar Utrecht vertrekt\n" in stdout.getvalue()  # 12 new tokens, as greedy alone gives
    n_long = len(tok(DOCS[0][:33])["input_ids"])
    assert stderr.getvalue().splitlines() == [
        "gpt2-dutch generate: input line 2 is not valid UTF-8 (byte 0xff at position 4); skipped",
        f"gpt2-dutch generate: note: the prompt ({n_long} tokens) gets {32 - n_long} new tokens, not 12 "
        "(--max-new-tokens): the model's context is 32 tokens"]


def test_tokenizer_difference_names_what_decides_the_ids(loaded, tiny_dataset):
    import copy

    from transformers import AutoTokenizer

    from gpt2_dutch.evaluate import tokenizer_difference, tokenizer_spec

    ours = tokenizer_spec(loaded[1])
    theirs = tokenizer_spec(AutoTokenizer.from_pretrained(str(tiny_dataset)))  # other model_max_length, no pad
    assert tokenizer_difference(theirs, ours) is None
    fewer_merges = copy.deepcopy(ours)
    fewer_merges["merges"] = fewer_merges["merges"][:-1]
    assert tokenizer_difference(fewer_merges, ours) == (
        f"1 of the BPE merges differ (dataset {len(ours['merges']) - 1:,} merges, model {len(ours['merges']):,})")
    other_eos = copy.deepcopy(ours)
    other_eos["eos"] = ("</s>", 1)
    assert tokenizer_difference(other_eos, ours) == "end-of-text token: dataset '</s>' (id 1), model " \
        "'<|endoftext|>' (id 0)"
    swapped = copy.deepcopy(ours)
    a, b = list(swapped["vocabulary"])[10:12]
    swapped["vocabulary"][a], swapped["vocabulary"][b] = swapped["vocabulary"][b], swapped["vocabulary"][a]
    assert tokenizer_difference(swapped, ours) == "2 of the 300 vocabulary entries have other ids or are missing"
    lowercase = copy.deepcopy(ours)
    lowercase["normalizer"] = {"type": "Lowercase"}
    assert tokenizer_difference(lowercase, ours).startswith("the normalizer settings differ")


@pytest.fixture(scope="session")
def long_context_model(tmp_path_factory, tiny_run) -> Path:
    """An untrained tiny GPT-2 with a 4096-token context that never samples <|endoftext|>: generations long enough
    to interrupt (an untrained model ends a text after ~300 tokens on average, sometimes before Ctrl-C arrives)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from gpt2_dutch.model.presets import gpt2_config

    tok = AutoTokenizer.from_pretrained(tiny_run / "final_model")
    out = tmp_path_factory.mktemp("long") / "final_model"
    AutoModelForCausalLM.from_config(gpt2_config("nano", len(tok), 4096, tok.eos_token_id)).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, suppress_tokens=[tok.eos_token_id]).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_interactive_through_a_pseudo_terminal(long_context_model):
    pexpect = pytest.importorskip("pexpect")
    tiny_run = long_context_model
    # SIGINT back to its default in the child: a test run started in the background by a non-interactive shell
    # (`cmd &`, nohup) ignores SIGINT, exec keeps that, and Python then installs no KeyboardInterrupt handler, so
    # Ctrl-C could not reach the REPL (the generation ran to its end and no "[stopped]" came)
    child = pexpect.spawn(sys.executable, ["-m", "gpt2_dutch", "generate", "--model-path", str(tiny_run),
                                           "--interactive", "--precision", "fp32", "--max-new-tokens", "4000"],
                          encoding="utf-8", timeout=60, env={"HOME": str(tiny_run), "PATH": "/usr/bin:/bin",
                                                             "GPT2_DUTCH_HISTORY": str(tiny_run / "hist")},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect("/help for commands")
    child.expect("> ")
    child.sendline("/temp 0.7")
    child.expect("temperature = 0.7")
    child.sendline("/max 0")
    child.expect("--max-new-tokens must be positive")
    child.sendline("Het museum")  # ~4,000 tokens: still generating when Ctrl-C arrives
    child.expect("Het museum")
    child.expect(".{20}")  # text is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("> ")
    child.sendline("/max 5")
    child.expect("max_new_tokens = 5")
    child.sendline("De trein")
    child.expect("De trein")
    child.expect("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_interactive_with_piped_stdin(tiny_run):
    r = subprocess.run([sys.executable, "-m", "gpt2_dutch", "generate", "--model-path", str(tiny_run),
                        "--interactive", "--greedy", "--max-new-tokens", "60", "--precision", "fp32"],
                       input="/topk 5\nDe trein naar\n/quit\nnever reached\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "top_k = 5" in r.stdout and "De trein naar Utrecht vertrekt" in r.stdout
    assert "never reached" not in r.stdout


def test_evaluate_dataset_equals_direct_computation(tiny_run, tiny_dataset, loaded):
    result = evaluate(EvaluateConfig(model_path=str(tiny_run), dataset_path=str(tiny_dataset), batch_size=3))
    model, _, _ = loaded
    from datasets import load_from_disk

    ids = torch.tensor(np.asarray(load_from_disk(str(tiny_dataset / "test"))["input_ids"]).astype(np.int64))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # mean over every predicted token
    m = json.loads((tiny_dataset / "manifest.json").read_text())["splits"]["test"]
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(loss / math.log(2) * m["tokens"] / m["bytes"], rel=1e-5)
    assert result["tokens_per_word"] == pytest.approx(m["tokens"] / m["words"])
    assert result["tokens_scored"] == ids.shape[0] * (ids.shape[1] - 1)


def test_evaluate_raw_files_scores_each_document_after_eos(tiny_run, loaded, tmp_path):
    model, tok, _ = loaded
    long_doc = " ".join(DOCS)  # longer than the 32-token context: scored in overlapping windows
    f = write_jsonl(tmp_path / "held_out.jsonl", [DOCS[1], long_doc])
    result = evaluate(EvaluateConfig(model_path=str(tiny_run), data_files=[str(f)], batch_size=2))
    eos = tok.eos_token_id
    nats = tokens = 0.0
    for doc in (DOCS[1], long_doc):
        ids = [eos] + tok(doc)["input_ids"]
        tokens += len(ids) - 1
        for i in range(1, len(ids)):  # direct: each token given up to 32 tokens, windows starting at k*16
            start = 0 if i < 32 else ((i - 32) // 16 + 1) * 16
            with torch.no_grad():
                logits = model(torch.tensor([ids[start:i]])).logits[0, -1]
            nats -= torch.log_softmax(logits, -1)[ids[i]].item()
    assert result["tokens_scored"] == tokens
    assert result["loss"] == pytest.approx(nats / tokens, rel=1e-4)
    n_bytes = len(DOCS[1].encode()) + len(long_doc.encode())
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4)
    assert result["documents"] == 2


@pytest.fixture
def bad_models(tmp_path: Path, tiny_run: Path) -> Path:
    """tmp_path with the directories the bad-input table names: empty/, pickled/, bert/, truncated/."""
    (tmp_path / "empty").mkdir()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_run / "final_model" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "distilbert"}))
    (bert / "model.safetensors").write_bytes(b"")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in (tiny_run / "final_model").iterdir():
        (truncated / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes())
    return tmp_path


BAD_INPUTS = [  # "{tmp}" is the bad_models directory, "{run}" the tiny run
    pytest.param(["generate", "--model-path", "{tmp}/nope"], "does not exist", id="generate-missing"),
    pytest.param(["generate", "--model-path", "{tmp}/empty"], "is not a model directory (no config.json)",
                 id="generate-empty-dir"),
    pytest.param(["generate", "--model-path", "{tmp}/pickled"], "has no safetensors weights (only pytorch_model.bin",
                 id="generate-pickle-only"),
    pytest.param(["generate", "--model-path", "{tmp}/bert"], "holds a 'distilbert' model, not a causal language model",
                 id="generate-not-causal"),
    pytest.param(["generate", "--model-path", "{tmp}/truncated"], "cannot load the model in",
                 id="generate-truncated-weights"),
    pytest.param(["generate", "--model-path", "{run}", "--temperature", "0"], "--temperature must be positive",
                 id="generate-temperature-zero"),
    pytest.param(["generate", "--model-path", "{run}", "--top-p", "1.5"], "--top-p must be in (0, 1]",
                 id="generate-top-p-above-1"),
    pytest.param(["generate", "--model-path", "{run}", "--prompt-file", "{tmp}/p.txt"], "prompt file",
                 id="generate-prompt-file-missing"),
    pytest.param(["evaluate", "--model-path", "{run}"], "give exactly one of --dataset-path and --data-files",
                 id="evaluate-no-data"),
    pytest.param(["evaluate", "--model-path", "{run}", "--data-files", "{tmp}/x.jsonl"], "not found",
                 id="evaluate-data-file-missing"),
    pytest.param(["evaluate", "--model-path", "{tmp}/empty", "--dataset-path", "{tmp}"], "no config.json",
                 id="evaluate-empty-model-dir"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_generate_and_evaluate_bad_inputs(args, message, bad_models, cli, tiny_run):
    rc, _, err = cli(*[a.replace("{tmp}", str(bad_models)).replace("{run}", str(tiny_run)) for a in args])
    assert_one_line_error(rc, err, message)
