"""Scoring text through the API (docs/serve.md, "Scoring"): echo and logprobs as OpenAI's legacy completions and
vLLM define them, max_tokens 0 with echo, the penalties and logit_bias, /v1/models/{id}, /tokenize and
/detokenize, and the one-line 404 for chat. Log-probabilities are checked against a direct fp32 forward of the
model and against `evaluate` on the same text.

One live server (uvicorn in a thread, loopback) on an untrained one-layer GPT-2 with the 300-token test BPE.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Live, live_server, random_model_dir

CONTEXT = 64
TEXT = "De kat zit op de mat. Het regent in Utrecht."


@pytest.fixture(scope="module")
def tiny_model(small_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained GPT-2 (one layer, width 32, a 64-token context) with the test BPE; a wider init than GPT-2's
    0.02, so that logits lie far enough apart that greedy choices are not near-ties."""
    return random_model_dir(tmp_path_factory.mktemp("scoring") / "final_model", small_tokenizer, CONTEXT,
                            initializer_range=0.5)


@pytest.fixture(scope="module")
def live(tiny_model: Path) -> Iterator[Live]:
    with live_server(tiny_model, max_batch=8, max_queue=8) as s:
        yield s


def forward_logprobs(live: Live, ids: list[int]) -> Any:
    """log_softmax of the model's fp32 logits at every position of `ids` (row t predicts token t + 1)."""
    import torch

    with torch.inference_mode():
        logits = live.server.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def ids_of(live: Live, text: str) -> list[int]:
    return live.server.tokenizer(text)["input_ids"]


def name(tok: Any, token: int) -> str:
    """A token as the logprobs fields name it: its text, or OpenAI's 'bytes:\\xNN' for part of a character."""
    text = tok.decode([token])
    if "\ufffd" not in text:
        return text
    from gpt2_dutch.serve.app import _BYTE_OF

    data = bytes(_BYTE_OF[c] for c in tok.convert_ids_to_tokens(token))
    return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def offsets(tok: Any, ids: list[int]) -> list[int]:
    """Where each token starts: the characters the tokens before it decode to, counting only whole characters
    (a token that ends halfway through a character's bytes does not move the next one's offset)."""
    out, last = [], 0
    for i in range(len(ids)):
        text = tok.decode(ids[:i])
        if not text.endswith("\ufffd"):
            last = len(text)
        out.append(last)
    return out


# ------------------------------------------------------------------------------------------- scoring a prompt


def test_echo_with_max_tokens_0_scores_the_prompt_as_a_forward_pass_does(live: Live):
    """What lm-evaluation-harness's local-completions sends for a log-likelihood."""
    tok = live.server.tokenizer
    ids = ids_of(live, TEXT)
    answer = live.complete(prompt=TEXT, echo=True, logprobs=1, max_tokens=0, temperature=0)
    choice = answer["choices"][0]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([i]) for i in ids] and "".join(lp["tokens"]) == TEXT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == offsets(tok, ids) == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    expected = forward_logprobs(live, ids)
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(float(expected[t - 1, ids[t]]), abs=1e-4)
        top = lp["top_logprobs"][t]
        best = int(expected[t - 1].argmax())
        assert top[name(tok, best)] == pytest.approx(float(expected[t - 1, best]), abs=1e-4)
        assert top[lp["tokens"][t]] == pytest.approx(lp["token_logprobs"][t], abs=1e-6)
        assert len(top) in (1, 2)  # the most likely token, and the prompt's own where it is another


def test_prompt_logprobs_equal_evaluates_on_the_same_text(live: Live, tiny_model: Path, tmp_path: Path):
    """`evaluate --data-files` scores a document after <|endoftext|>; the same ids sent as a prompt give the same
    nats (the first prompt token, <|endoftext|>, has no log-probability, as evaluate does not score it)."""
    from gpt2_dutch.evaluate import EvaluateConfig, evaluate_files

    tok = live.server.tokenizer
    data = tmp_path / "held_out.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n", encoding="utf-8")
    result = evaluate_files(live.server.model, tok, EvaluateConfig(model_path=str(tiny_model), data_files=[str(data)]))
    answer = live.complete(prompt=tok.eos_token + TEXT, echo=True, logprobs=0, max_tokens=0)
    lp = answer["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) - 1 == result["tokens_scored"]
    nats = -sum(lp["token_logprobs"][1:])
    assert nats / result["tokens_scored"] == pytest.approx(result["loss"], abs=1e-4)
    # logprobs 0: no alternatives, only the token itself (OpenAI always lists the chosen token)
    assert all(top is None or list(top) == [token] for top, token in zip(lp["top_logprobs"], lp["tokens"],
                                                                          strict=True))


def test_generated_tokens_carry_logprobs_of_the_model_before_sampling(live: Live):
    tok = live.server.tokenizer
    prompt = "Het regent"
    answer = live.complete(prompt=prompt, max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    generated = ids_of(live, prompt)  # the prompt's ids, followed below by the greedy ones
    assert len(lp["tokens"]) == answer["usage"]["completion_tokens"] == 6
    # the generated ids, recovered from the forward pass: greedy picks the argmax of each step
    ids = list(generated)
    expected_logprobs = []
    for _ in range(6):
        row = forward_logprobs(live, ids)[-1]
        ids.append(int(row.argmax()))
        expected_logprobs.append(float(row.max()))
    new = ids[len(generated):]
    assert choice["text"] == tok.decode(new) and lp["tokens"] == [name(tok, i) for i in new]
    assert lp["token_logprobs"] == pytest.approx(expected_logprobs, abs=1e-4)
    assert lp["text_offset"] == offsets(tok, new)
    for top, logprob in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob, abs=1e-6)
    # echo with generation: the text and the logprobs run over the prompt, then the completion
    echoed = live.complete(prompt=prompt, max_tokens=6, temperature=0, logprobs=3, ignore_eos=True, echo=True)
    e = echoed["choices"][0]
    assert e["text"] == prompt + choice["text"]
    assert e["logprobs"]["tokens"] == [name(tok, i) for i in generated] + lp["tokens"]
    assert e["logprobs"]["token_logprobs"][len(generated):] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert e["logprobs"]["text_offset"][len(generated):] == [len(prompt) + o for o in lp["text_offset"]]
    # logprobs are the model's: sampling at another temperature does not change what a token is said to cost
    hot = live.complete(prompt=prompt, max_tokens=1, temperature=2.0, seed=3, logprobs=0,
                        ignore_eos=True)["choices"][0]["logprobs"]
    row = forward_logprobs(live, generated)[-1]
    token = next(i for i in range(len(tok)) if name(tok, i) == hot["tokens"][0])
    assert hot["token_logprobs"][0] == pytest.approx(float(row[token]), abs=1e-4)


def test_streamed_logprobs_add_up_to_the_whole_answer(live: Live):
    body = {"prompt": "De kat", "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True,
            "ignore_eos": True}
    whole = live.complete(**body)["choices"][0]
    events = live.stream(**body)
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    joined: dict[str, list[Any]] = {k: [] for k in whole["logprobs"]}
    for c in chunks:
        for k in joined:
            joined[k] += c["logprobs"][k]
    assert joined["tokens"] == whole["logprobs"]["tokens"]
    assert joined["text_offset"] == whole["logprobs"]["text_offset"]
    assert joined["token_logprobs"][0] is None
    assert joined["token_logprobs"][1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_the_openai_client_reads_the_scores(live: Live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="-", max_retries=0)
    answer = client.completions.create(model=live.server.name, prompt=TEXT, echo=True, logprobs=1, max_tokens=0)
    choice = answer.choices[0]
    assert choice.text == TEXT and choice.logprobs.token_logprobs[0] is None
    ids = ids_of(live, TEXT)
    expected = forward_logprobs(live, ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [float(expected[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4)
    assert client.models.retrieve(live.server.name).id == live.server.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# ------------------------------------------------------------------------------- penalties and logit_bias


def test_adjust_applies_bias_and_penalties_as_openai_defines_them():
    import torch

    from gpt2_dutch.serve.engine import Sampling, Sequence, adjust

    logits = torch.zeros((2, 10))
    seq = Sequence([1], 4, Sampling(presence_penalty=0.25, frequency_penalty=0.5, logit_bias={3: 2.0, 7: -100}),
                   lambda token, reason: None)
    seq.counts = {5: 3, 7: 1}
    plain = Sequence([1], 4, Sampling(), lambda token, reason: None)
    plain.counts = {5: 3}
    out = adjust(logits, [seq, plain])
    expected = torch.zeros(10)
    expected[3] = 2.0
    expected[5] = -(3 * 0.5 + 0.25)
    expected[7] = -100 - (1 * 0.5 + 0.25)
    assert torch.equal(out[0], expected)
    assert torch.equal(out[1], torch.zeros(10))  # a row without settings is untouched (no penalty from counts)
    assert torch.equal(logits, torch.zeros((2, 10)))  # the raw logits stay as they were (their logprobs are told)
    assert adjust(logits, [plain, plain]) is logits  # no settings at all: nothing copied


def test_logit_bias_forces_or_bans_a_token_under_greedy(live: Live):
    tok = live.server.tokenizer
    token = tok.convert_tokens_to_ids("k")
    forced = live.complete(prompt="Het regent", max_tokens=4, temperature=0, ignore_eos=True,
                           logit_bias={str(token): 100})
    assert forced["choices"][0]["text"] == "kkkk"
    plain = live.complete(prompt="Het regent", max_tokens=1, temperature=0, ignore_eos=True)
    first = int(forward_logprobs(live, ids_of(live, "Het regent"))[-1].argmax())
    assert plain["choices"][0]["text"] == tok.decode([first])
    banned = live.complete(prompt="Het regent", max_tokens=1, temperature=0, logprobs=0, ignore_eos=True,
                           logit_bias={str(first): -100})
    assert banned["choices"][0]["logprobs"]["tokens"] != [name(tok, first)]
    # sampled, a -100 bias bans the token however often it is drawn; the logprob told is still the model's
    sampled = live.complete(prompt="Het regent", max_tokens=8, temperature=1.0, seed=1, n=4, ignore_eos=True,
                            logit_bias={str(token): -100})
    assert all("k" not in c["text"] for c in sampled["choices"])


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
def test_penalties_lower_repeated_tokens_by_count_times_penalty(live: Live, field: str):
    """Each greedy token is the argmax of the model's logits less penalty x count (frequency) or penalty x
    (count > 0) (presence) of the tokens generated so far: checked against a direct forward at every step."""
    import torch

    prompt_ids = ids_of(live, "De kat")
    penalty = 1.5
    answer = live.complete(prompt="De kat", max_tokens=20, temperature=0, ignore_eos=True, logprobs=0,
                           **{field: penalty})
    tokens = answer["choices"][0]["logprobs"]["tokens"]
    ids, counts = list(prompt_ids), torch.zeros(len(live.server.tokenizer))
    for step, text in enumerate(tokens):
        with torch.inference_mode():
            logits = live.server.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        adjusted = logits - penalty * (counts if field == "frequency_penalty" else (counts > 0).float())
        chosen = int(adjusted.argmax())
        assert name(live.server.tokenizer, chosen) == text, step
        ids.append(chosen)
        counts[chosen] += 1
    unpenalized = live.complete(prompt="De kat", max_tokens=20, temperature=0, ignore_eos=True)
    assert unpenalized["choices"][0]["text"] != answer["choices"][0]["text"]  # the penalty did change something


def test_settings_stay_with_their_own_sequence_in_a_shared_batch(live: Live):
    """A biased, a penalized, a scored and a plain sequence decoded in one batch: each gets exactly what it gets
    alone (the bias and the penalties of one row never reach another)."""
    import threading

    from gpt2_dutch.serve.engine import Sampling, Sequence

    tok = live.server.tokenizer
    k = tok.convert_tokens_to_ids("k")

    def run(specs: list[tuple[str, Sampling, dict[str, Any]]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        done = threading.Semaphore(0)
        seqs = []
        for label, sampling, extra in specs:
            tokens: list[int] = []

            def emit(token: int | None, reason: str | None, tokens: list[int] = tokens) -> None:
                if token is not None:
                    tokens.append(token)
                else:
                    done.release()

            seq = Sequence(ids_of(live, "De kat"), extra.pop("max_new_tokens", 12), sampling, emit, ignore_eos=True,
                           **extra)
            seqs.append(seq)
            out[label] = (tokens, seq)
        live.server.engine.submit(seqs)
        for _ in specs:
            assert done.acquire(timeout=30)
        return {label: (tokens, [e[0] for e in seq.scored], [e and e[0] for e in seq.prompt_scored or []])
                for label, (tokens, seq) in out.items()}

    specs = [("plain", Sampling(temperature=0), {}),
             ("biased", Sampling(temperature=0, logit_bias={k: 100.0}), {}),
             ("penalized", Sampling(temperature=0, frequency_penalty=2.0), {"logprobs": 2}),
             ("scored", Sampling(temperature=0), {"logprobs": 1, "score_prompt": True, "max_new_tokens": 0})]
    alone = {}
    for label, sampling, extra in specs:
        alone.update(run([(label, sampling, dict(extra))]))
    together = run([(label, sampling, dict(extra)) for label, sampling, extra in specs])
    assert together["biased"][0] == [k] * 12 and together["scored"][0] == []
    assert together["plain"][0] == alone["plain"][0] and together["penalized"][0] == alone["penalized"][0]
    assert together["plain"][0] != together["penalized"][0]
    assert together["penalized"][1] == pytest.approx(alone["penalized"][1], abs=1e-5)
    assert together["scored"][2] == pytest.approx(alone["scored"][2], abs=1e-6)
    assert len(together["scored"][2]) == len(ids_of(live, "De kat")) - 1


# ------------------------------------------------------------------------------------------------ bad input


BAD = [  # (id, body, param, words of the message)
    ("echo a string", {"prompt": "Hallo", "echo": "yes"}, "echo", "true or false"),
    ("max_tokens 0 without echo", {"prompt": "Hallo", "max_tokens": 0}, "max_tokens", "allowed with echo"),
    ("max_tokens negative with echo", {"prompt": "Hallo", "max_tokens": -1, "echo": True}, "max_tokens",
     "at least 1"),
    ("logprobs 21", {"prompt": "Hallo", "logprobs": 21}, "logprobs", "between 0 and 20"),
    ("logprobs negative", {"prompt": "Hallo", "logprobs": -1}, "logprobs", "between 0 and 20"),
    ("logprobs a string", {"prompt": "Hallo", "logprobs": "1"}, "logprobs", "integer"),
    ("logprobs true", {"prompt": "Hallo", "logprobs": True}, "logprobs", "integer"),
    ("presence_penalty 3", {"prompt": "Hallo", "presence_penalty": 3}, "presence_penalty", "between -2 and 2"),
    ("frequency_penalty -2.5", {"prompt": "Hallo", "frequency_penalty": -2.5}, "frequency_penalty",
     "between -2 and 2"),
    ("frequency_penalty a string", {"prompt": "Hallo", "frequency_penalty": "0.5"}, "frequency_penalty", "number"),
    ("logit_bias a list", {"prompt": "Hallo", "logit_bias": [1, 2]}, "logit_bias", "object of token ids"),
    ("logit_bias a word as key", {"prompt": "Hallo", "logit_bias": {"hallo": 5}}, "logit_bias", "decimal"),
    ("logit_bias a negative id", {"prompt": "Hallo", "logit_bias": {"-1": 5}}, "logit_bias", "decimal"),
    ("logit_bias an id past the vocabulary", {"prompt": "Hallo", "logit_bias": {"300": 5}}, "logit_bias",
     "not in this model's vocabulary"),
    ("logit_bias 101", {"prompt": "Hallo", "logit_bias": {"5": 101}}, "logit_bias", "-100 to 100"),
    ("logit_bias a string value", {"prompt": "Hallo", "logit_bias": {"5": "up"}}, "logit_bias", "-100 to 100"),
    ("suffix", {"prompt": "Hallo", "suffix": "!"}, "suffix", "not supported"),
]


@pytest.mark.parametrize(("body", "param", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_scoring_fields_are_400_in_one_line(live: Live, body: dict[str, Any], param: str, words: str):
    before = live.server.engine.stats()["steps"]
    status, _, answer = live.request("POST", "/v1/completions", body)
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == param and words in error["message"] and "\n" not in error["message"]
    assert live.server.engine.stats()["steps"] == before  # refused before anything ran


# -------------------------------------------------------------------- models, tokenize, detokenize, chat


def test_a_model_by_id_and_an_unknown_id(live: Live):
    status, _, model = live.request("GET", f"/v1/models/{live.server.name}")
    assert status == 200 and model["id"] == live.server.name and model["object"] == "model"
    status, _, answer = live.request("GET", "/v1/models/gpt-4/turbo")
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert "'gpt-4/turbo' does not exist" in answer["error"]["message"] and "\n" not in answer["error"]["message"]


def test_tokenize_and_detokenize_as_vllm_answers_them(live: Live):
    tok = live.server.tokenizer
    status, _, answer = live.request("POST", "/tokenize", {"model": live.server.name, "prompt": TEXT})
    assert status == 200
    assert answer == {"count": len(ids_of(live, TEXT)), "max_model_len": CONTEXT, "tokens": ids_of(live, TEXT),
                      "token_strs": None}
    strs = live.request("POST", "/tokenize", {"prompt": TEXT, "return_token_strs": True})[2]["token_strs"]
    assert strs == tok.convert_ids_to_tokens(ids_of(live, TEXT))
    status, _, back = live.request("POST", "/detokenize", {"model": live.server.name, "tokens": answer["tokens"]})
    assert status == 200 and back == {"prompt": TEXT}
    for path, body, words in (("/tokenize", {"text": TEXT}, "'prompt' must be a string"),
                              ("/tokenize", {"prompt": TEXT, "add_special_tokens": "no"}, "true or false"),
                              ("/detokenize", {"tokens": [1, 300]}, "not in this model's vocabulary"),
                              ("/detokenize", {"tokens": "1 2"}, "list of token ids"),
                              ("/detokenize", {"tokens": [1, True]}, "list of token ids")):
        status, _, answer = live.request("POST", path, body)
        assert status == 400 and words in answer["error"]["message"], (path, body, answer)
    status, _, answer = live.request("POST", "/tokenize", raw=json.dumps({"prompt": TEXT}).encode(),
                                     headers={"Content-Type": "text/plain"})
    assert status == 415 and answer["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_chat_is_a_one_line_404_that_points_to_completions(live: Live, method: str):
    body = {"model": live.server.name, "messages": [{"role": "user", "content": "Hallo"}]}
    status, headers, answer = live.request(method, "/v1/chat/completions", body if method == "POST" else None)
    assert status == 404 and headers["content-type"] == "application/json"
    message = answer["error"]["message"]
    assert "base model" in message and "/v1/completions" in message and "\n" not in message
    assert answer["error"]["code"] == "chat_not_supported"


def test_scores_are_finite_for_every_prompt_token(live: Live):
    """A one-token prompt scored alone: nothing to score but the text itself (its only logprob is null)."""
    answer = live.complete(prompt="k", echo=True, logprobs=5, max_tokens=0)
    lp = answer["choices"][0]["logprobs"]
    assert lp == {"tokens": ["k"], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    answer = live.complete(prompt=TEXT, echo=True, logprobs=20, max_tokens=0)
    values = [v for top in answer["choices"][0]["logprobs"]["top_logprobs"][1:] for v in top.values()]
    assert all(math.isfinite(v) and v <= 0 for v in values) and len(values) >= 20
