"""The model card of a trained model: `final_model/README.md`, Hugging Face metadata and how the model was made.

`train` writes it into final_model (inside the staging directory, before the rename, so a card is never
half-written); `gpt2-dutch push` uploads it with the model. In Python:

    from gpt2_dutch.runs.card import card_facts, render_card
    facts = card_facts("trained_models/gpt2-dutch-tiny-latest")   # a final_model, run directory or -latest link
    facts["eval"]["bits_per_byte"], facts["training"]["tokens"], facts["model"]["parameters"]
    print(render_card(facts))                                      # the README.md text

`card_facts(model_dir) -> dict` reads only small files (config.json, the run's run_config.json and
metrics.jsonl, the dataset's manifest.json): no torch, no network, so a server or a page may call it per
request. Every fact that a file does not record is None rather than a guess. The keys:

    name        the run's directory name (or the model directory's name)
    license     the license identifier (train --license; default apache-2.0)
    repo_id     the Hub repository of train --push-to-hub, or None
    model       size, n_layer, n_embd, n_head, context, vocab_size, parameters
    training    steps, tokens, wall_time_s, hardware, world_size, precision, status, settings (a dict of the
                run_config.json settings that say how it was trained, paths left out), init_from (a name),
                extensions, started_at
    eval        loss (nats/token), perplexity, bits_per_byte, step, tokens of the last evaluation, or None
    curve       the evaluations: [{step, tokens, eval_loss, eval_bpb}, ...], oldest first
    train_curve the logged training losses: [(step, loss), ...], oldest first
    dataset     kind (hub, files, builtin), hub_id, config, description, name, test_split, documents, tokens,
                chunk_size (None when the dataset's manifest is gone)
    tokenizer   vocab_size, origin, fertility (tokens per whitespace word on the held-out split), fertility_train
    loss_curve  "loss.png" when the model directory (or its run) has the plot, else None

Paths never reach the card: local data files, the dataset and the init model are named by their names, not
where they lie, and the playground's card (serve/card.py) is a view of these facts.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.core.reading import Opt, read_json_or_none
from gpt2_dutch.runs.records import METRICS, locate, read_metrics_file, read_run_config_or_none

DEFAULT_LICENSE = "apache-2.0"
CARD = "README.md"
LOSS_CURVE = "loss.png"
HUB_TAGS = ["gpt2", "dutch", "text-generation", "causal-lm", "gpt2-dutch"]
# The load snippet's first line while the model has no Hub id; `push` puts the repository's id in its place.
MODEL_ID_PLACEHOLDER = 'model_id = "path/to/final_model"  # this directory, or its Hub id ("OWNER/NAME") once pushed'

# The run_config.json settings that say how a model was trained, in the card's order; paths (dataset_path,
# output_dir, resume, init_from) and console settings are left out on purpose: they say where, not how.
SETTINGS = ["model_size", "context", "batch_size", "gradient_accumulation_steps", "world_size", "tokens_per_step",
            "total_steps", "length_set_by", "epochs", "max_steps", "max_tokens", "max_time", "learning_rate",
            "optimizer", "muon_lr", "schedule", "warmup", "cooldown", "weight_decay", "precision", "fsdp",
            "gradient_checkpointing", "compile", "loss_chunk_tokens", "seed"]


# ------------------------------------------------------------------------------------------------ reading
# The run's records are read through gpt2_dutch.runs.records; a missing or damaged file (or one whose fields the card
# reads have the wrong type) makes the card state less, it never fails a run.

MODEL_CONFIG_SCHEMA = {key: Opt(int) for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "n_inner")}
MODEL_CONFIG_SCHEMA["tie_word_embeddings"] = Opt(bool)
_SPLIT_FACTS = Opt({"documents": Opt(int), "tokens": Opt(int), "words": Opt(int)})
MANIFEST_FACTS_SCHEMA = {"source": Opt({"type": Opt(str), "files": Opt(list)}), "vocab_size": Opt(int),
                         "chunk_size": Opt(int), "tokenizer": Opt({"vocab_size": Opt(int), "origin": Opt(str)}),
                         "splits": Opt({"train": _SPLIT_FACTS, "test": _SPLIT_FACTS})}

def gpt2_parameters(config: dict[str, Any]) -> int | None:
    """Parameters of a GPT-2 from its config.json (for a model without its run record); an untied LM head
    (tie_word_embeddings false) has its own [vocab, width] weight."""
    try:
        v, p, d, n = (int(config[k]) for k in ("vocab_size", "n_positions", "n_embd", "n_layer"))
    except (KeyError, TypeError, ValueError):
        return None
    inner = int(config.get("n_inner") or 4 * d)
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * inner + inner) + (inner * d + d)
    head = 0 if config.get("tie_word_embeddings", True) else v * d
    return v * d + head + p * d + n * block + 2 * d


def card_facts(model_dir: str | Path, run_dir: str | Path | None = None, hardware: str | None = None) -> dict:
    """What the card says about a model, as a dict (see the module docstring for the keys).

    `model_dir`: a final_model, a run directory or a -latest link. `run_dir`: the run that made it, when the
    model directory is not (yet) inside it (train writes the card into a staging directory). `hardware`: what
    this run trained on, when known (train passes the machine it runs on; run_config.json does not record it).
    """
    model_path, found_run = locate(model_dir)
    run = Path(run_dir).resolve() if run_dir is not None else found_run
    config = read_json_or_none(model_path / "config.json", schema=MODEL_CONFIG_SCHEMA) or {}
    rc: dict[str, Any] = read_run_config_or_none(run) or {}
    try:
        records = read_metrics_file(run / METRICS) if run else []
    except UsageError:  # not a regular file, too large, a record of the wrong types: no curve, no scores
        records = []
    manifest = None
    if rc.get("dataset_path"):
        manifest = read_json_or_none(Path(rc["dataset_path"]) / "manifest.json", schema=MANIFEST_FACTS_SCHEMA)
    world = rc.get("world_size")

    evals = [r for r in records if r.get("eval_loss") is not None]
    last_eval = max(evals, key=lambda r: r.get("step", 0)) if evals else None  # the last of the highest step
    if last_eval is not None:
        last_eval = [r for r in evals if r.get("step", 0) == last_eval.get("step", 0)][-1]
    tokens = max((r["tokens"] for r in records if isinstance(r.get("tokens"), (int, float))), default=None)
    steps = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)
    runtimes = [r["train_runtime"] for r in records if isinstance(r.get("train_runtime"), (int, float))]
    hardware = hardware or rc.get("hardware")
    if hardware and world and world > 1:
        hardware = f"{world} x {hardware}"

    eval_facts = None
    if last_eval is not None:
        loss = float(last_eval["eval_loss"])
        eval_facts = {"loss": loss, "perplexity": last_eval.get("eval_ppl", math.exp(min(loss, 50.0))),
                      "bits_per_byte": last_eval.get("eval_bpb"), "step": last_eval.get("step"),
                      "tokens": last_eval.get("tokens")}
    loss_curve = LOSS_CURVE if (model_path / LOSS_CURVE).is_file() or (run and (run / LOSS_CURVE).is_file()) \
        else None
    return {
        "name": run.name if run else model_path.name,
        "license": rc.get("license") or DEFAULT_LICENSE,
        "repo_id": rc.get("push_to_hub"),
        "model": {
            "size": rc.get("model_size"),
            "n_layer": config.get("n_layer"), "n_embd": config.get("n_embd"), "n_head": config.get("n_head"),
            "context": config.get("n_positions", rc.get("context")),
            "vocab_size": config.get("vocab_size", rc.get("vocab_size")),
            "parameters": rc.get("parameters") or gpt2_parameters(config),
        },
        "training": {
            "steps": steps if steps is not None else rc.get("total_steps"),
            "tokens": tokens,
            "wall_time_s": round(sum(runtimes), 1) if runtimes else None,
            "hardware": hardware,
            "world_size": world,
            "precision": rc.get("precision"),
            "status": rc.get("status"),
            "settings": {k: rc[k] for k in SETTINGS if rc.get(k) is not None},
            "init_from": Path(rc["init_from"]).name if rc.get("init_from") else None,
            "extensions": rc.get("extensions") or [],
            "started_at": rc.get("started_at"),
        },
        "eval": eval_facts,
        "curve": [{"step": r.get("step"), "tokens": r.get("tokens"), "eval_loss": r["eval_loss"],
                   "eval_bpb": r.get("eval_bpb")} for r in evals],
        "train_curve": [(r["step"], r["loss"]) for r in records
                        if finite(r.get("loss")) and isinstance(r.get("step"), int)],
        "dataset": _dataset_facts(manifest, rc),
        "tokenizer": _tokenizer_facts(manifest),
        "loss_curve": loss_curve,
    }


def finite(value: Any) -> bool:
    """A real, finite number (not a bool, not NaN or infinity): what a curve or a JSON answer may hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dataset_facts(manifest: dict[str, Any] | None, rc: dict[str, Any]) -> dict[str, Any] | None:
    if not isinstance(manifest, dict):
        return None
    source = manifest.get("source") or {}
    kind = source.get("type")
    files = [Path(str(f)).name for f in source.get("files") or []]  # names only: no home directories
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    if kind == "hub":
        description = f"{source.get('dataset')} (config {source.get('config')}) from the Hugging Face Hub"
    elif kind == "builtin":
        description = f"the Dutch sample shipped with gpt2-dutch ({shown})"
    else:
        description = f"local text files: {shown}" if files else "local text files"
    splits = manifest.get("splits") or {}
    return {
        "kind": kind,
        "hub_id": source.get("dataset") if kind == "hub" else None,
        "config": source.get("config") if kind == "hub" else None,
        "description": description,
        "name": Path(str(rc.get("dataset_path", ""))).name or None,
        "test_split": source.get("test_split"),
        "documents": {k: s.get("documents") for k, s in splits.items()},
        "tokens": {k: s.get("tokens") for k, s in splits.items()},
        "chunk_size": manifest.get("chunk_size"),
    }


def fertility(split: dict[str, Any] | None) -> float | None:
    """Tokens per whitespace word of a manifest split: the <|endoftext|> preprocess adds after each document is
    not a token of the text, so it is left out."""
    if not split or not split.get("words"):
        return None
    return (split.get("tokens", 0) - split.get("documents", 0)) / split["words"]


def _tokenizer_facts(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(manifest, dict):
        return None
    tok = manifest.get("tokenizer") or {}
    origin = str(tok.get("origin") or "")
    if origin and not origin.startswith("trained") and (Path(origin).expanduser().is_absolute()
                                                        or origin.startswith((".", "~"))):
        origin = f"the local tokenizer {Path(origin).name}"  # a path on the training machine: its name only
    splits = manifest.get("splits") or {}
    return {"vocab_size": tok.get("vocab_size", manifest.get("vocab_size")), "origin": origin or None,
            "fertility": fertility(splits.get("test")), "fertility_train": fertility(splits.get("train"))}


def describe_hardware() -> str:
    """What this process trains on: the GPU's name, or the CPU's model and the threads torch uses."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple GPU (MPS)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU: {name}, {threads} thread{'s' if threads != 1 else ''}"


# ---------------------------------------------------------------------------------------------- rendering

def _count(n: float | None) -> str:
    if n is None:
        return "not recorded"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _exact(n: int | None) -> str:
    return "not recorded" if n is None else (f"{n:,} ({_count(n)})" if n >= 1000 else f"{n}")


def _held_out(test_split: str | None) -> str:
    """preprocess records "own" or "carved 0.1 of train (seed 42)": said in words."""
    import re

    if test_split == "own":
        return "the dataset's own test split"
    m = re.fullmatch(r"carved ([0-9.]+) of train \(seed (\d+)\)", test_split or "")
    if m:
        return f"{float(m.group(1)):.0%} of the documents, held out from training (seed {m.group(2)})"
    return test_split or "held-out documents"


def _metric(value: float | None) -> float | None:
    # 4 decimals: what the metrics say, without float noise on the Hub's evaluation widget
    return None if value is None else round(float(value), 4)


def front_matter(facts: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata (https://huggingface.co/docs/hub/model-cards#model-card-metadata)."""
    meta: dict[str, Any] = {"language": ["nl"], "license": facts["license"], "library_name": "transformers",
                            "pipeline_tag": "text-generation", "tags": list(HUB_TAGS)}
    dataset = facts.get("dataset")
    if dataset and dataset.get("hub_id"):
        meta["datasets"] = [dataset["hub_id"]]
    ev = facts.get("eval")
    if ev:
        if dataset and dataset.get("hub_id"):
            data = {"type": dataset["hub_id"], "name": f"{dataset['hub_id']} ({dataset.get('config')}), held-out",
                    "config": dataset.get("config")}
        else:
            data = {"type": "local", "name": dataset["description"] if dataset else "held-out text"}
        data["split"] = "test" if dataset and dataset.get("test_split") == "own" else "held-out documents"
        metrics = [{"type": "loss", "value": _metric(ev["loss"]), "name": "eval loss (nats/token)"},
                   {"type": "perplexity", "value": _metric(ev["perplexity"]), "name": "perplexity"}]
        if ev.get("bits_per_byte") is not None:
            metrics.append({"type": "bits_per_byte", "value": _metric(ev["bits_per_byte"]), "name": "bits per byte"})
        meta["model-index"] = [{"name": facts["name"], "results": [{
            "task": {"type": "text-generation", "name": "Causal language modeling"},
            "dataset": data, "metrics": metrics}]}]
    return meta


def render_card(facts: dict[str, Any]) -> str:
    """The model card (README.md) for `facts` from `card_facts`: YAML front matter, then the body."""
    import yaml

    m, t, ev, ds, tok = facts["model"], facts["training"], facts.get("eval"), facts.get("dataset"), \
        facts.get("tokenizer")
    shape = (f"{m['n_layer']} layers, {m['n_embd']} wide, {m['n_head']} heads" if m.get("n_layer") else
             "shape not recorded")
    size = f"GPT-2 {m['size']}" if m.get("size") else "GPT-2"
    lines = ["---", yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {facts['name']}", "",
             f"A Dutch {size} language model ({_count(m.get('parameters'))} parameters; {shape}; context "
             f"{m.get('context')} tokens; vocabulary {m.get('vocab_size')}) trained from scratch with "
             "gpt2-dutch on "
             f"{ds['description'] if ds else 'Dutch text'}.", ""]
    if ev:
        bpb = f", **{ev['bits_per_byte']:.3f} bits per byte**" if ev.get("bits_per_byte") is not None else ""
        lines += [f"On held-out documents it reaches an eval loss of **{ev['loss']:.4f} nats/token** (perplexity "
                  f"{ev['perplexity']:.2f}){bpb}, after {_count(ev.get('tokens'))} training tokens.", ""]

    lines += ["## How it was trained", "",
              "| | |", "|---|---|",
              f"| parameters | {_exact(m.get('parameters'))} |",
              f"| shape | {shape}, context {m.get('context')}, vocabulary {m.get('vocab_size')} |",
              f"| training tokens | {_exact(t.get('tokens'))} |",
              f"| optimizer steps | {t.get('steps') if t.get('steps') is not None else 'not recorded'} |",
              f"| wall time (training loop) | {_duration(t.get('wall_time_s'))} |",
              f"| hardware | {t.get('hardware') or 'not recorded'} |",
              f"| precision | {t.get('precision') or 'not recorded'} |"]
    if ds:
        test = _held_out(ds.get("test_split"))
        lines.append(f"| data | {ds['description']}; {_count((ds.get('tokens') or {}).get('train'))} training "
                     f"tokens in {ds.get('chunk_size')}-token chunks; evaluated on {test} |")
    if t.get("init_from"):
        lines.append(f"| initialized from | the weights of {t['init_from']} |")
    for ext in t.get("extensions") or []:
        lines.append(f"| extended | from step {ext.get('from_step')} to {ext.get('to_step')} |")
    settings = t.get("settings") or {}
    if settings:
        lines += ["", "Settings (from the run's `run_config.json`):", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in settings.items()]

    lines += ["", "## Tokenizer", ""]
    if tok:
        fert = (f"**{tok['fertility']:.2f} tokens per word** on the held-out text (whitespace-separated words, "
                "the end-of-text token after each document not counted)" if tok.get("fertility") is not None
                else "fertility not recorded")
        if tok.get("fertility_train") is not None:
            fert += f"; {tok['fertility_train']:.2f} on the training text"
        lines += [f"Byte-level BPE with {tok.get('vocab_size')} tokens; origin: "
                  f"{tok.get('origin') or 'not recorded'}. Fertility: {fert}.", ""]
    else:
        lines += [f"Byte-level BPE, {m.get('vocab_size')} tokens (the dataset's record is gone: fertility not "
                  "recorded).", ""]

    lines += ["## Loss curve", ""]
    if facts.get("loss_curve"):
        lines += [f"![Train and eval loss against training tokens]({facts['loss_curve']})", ""]
    curve = facts.get("curve") or []
    if curve:
        lines += ["| step | tokens | eval loss | bits per byte |", "|---:|---:|---:|---:|"]
        for r in _sample(curve, 10):
            bpb = f"{r['eval_bpb']:.3f}" if r.get("eval_bpb") is not None else ""
            lines.append(f"| {r['step']} | {_count(r.get('tokens'))} | {r['eval_loss']:.4f} | {bpb} |")
        lines.append("")
    elif not facts.get("loss_curve"):
        lines += ["Not recorded.", ""]

    lines += ["## How to use it", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
              f'model_id = "{facts["repo_id"]}"' if facts.get("repo_id") else MODEL_ID_PLACEHOLDER,
              "generator = pipeline(\"text-generation\", model=model_id)",
              "print(generator(\"Het weer is vandaag\", max_new_tokens=40)[0][\"generated_text\"])", "",
              "# or step by step",
              "tokenizer = AutoTokenizer.from_pretrained(model_id)",
              "model = AutoModelForCausalLM.from_pretrained(model_id)",
              "inputs = tokenizer(\"Er was eens een\", return_tensors=\"pt\")",
              "out = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_k=50, top_p=0.95)",
              "print(tokenizer.decode(out[0], skip_special_tokens=True))", "```", "",
              "With gpt2-dutch installed: `gpt2-dutch generate --model-path MODEL --interactive`, or "
              "`gpt2-dutch serve --model-path MODEL` for an OpenAI-compatible API and a browser playground.", ""]

    lines += ["## Limitations", "", *_limitations(facts), ""]
    return "\n".join(lines)


def _sample(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most `n` rows spread evenly over `rows`, the first and the last always among them."""
    if len(rows) <= n:
        return rows
    picks = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in picks]


def _limitations(facts: dict[str, Any]) -> list[str]:
    m, t = facts["model"], facts["training"]
    out = []
    tokens = t.get("tokens")
    if m.get("size") == "tiny" or (tokens is not None and tokens < 10_000_000):
        out.append(f"- **A demonstration model**: trained on {_count(tokens)} tokens, it has learnt little more "
                   "than the surface of its training text; do not expect fluent or factual Dutch.")
    out += [
        "- A base language model: it continues text, it does not follow instructions or answer questions, and it "
        "was not tuned for safety.",
        "- It reproduces what its training text holds, errors, biases and offensive language included, and it "
        "invents facts with confidence: do not use its output as information about people or the world.",
        f"- Trained and evaluated on Dutch only, with a context of {m.get('context')} tokens; other languages and "
        "longer texts fall outside what it saw.",
        "- The evaluation is the loss on held-out documents of the same collection as the training text, not a "
        "benchmark of downstream tasks.",
    ]
    return out


# ------------------------------------------------------------------------------------------------ writing

def name_repo_in_card(model_dir: str | Path, repo_id: str) -> bool:
    """Put the Hub id in the card's load snippet in place of the local placeholder (a card edited by hand keeps
    every other line); whether the card changed."""
    from gpt2_dutch.core.files import write_text_atomic

    card = Path(model_dir) / CARD
    text = card.read_text(encoding="utf-8")
    if MODEL_ID_PLACEHOLDER not in text:
        return False
    write_text_atomic(card, text.replace(MODEL_ID_PLACEHOLDER, f'model_id = "{repo_id}"'))
    return True


def write_card(model_dir: str | Path, run_dir: str | Path | None = None, hardware: str | None = None) -> Path:
    """Write README.md (and the run's loss.png) into `model_dir`, each atomically; return the card's path.

    A card must never cost a trained model: if the run's records cannot be turned into the full card (a bug),
    a warning is printed and a card with the metadata alone is written instead.
    """
    from gpt2_dutch.core.files import write_bytes_atomic, write_text_atomic

    model_path = Path(model_dir)
    run = Path(run_dir) if run_dir is not None else locate(model_path)[1]
    if run is not None and (run / LOSS_CURVE).is_file():
        write_bytes_atomic(model_path / LOSS_CURVE, (run / LOSS_CURVE).read_bytes())
    try:
        text = render_card(card_facts(model_path, run, hardware))
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"warning: the model card could not be written in full ({type(e).__name__}: {e}); writing the "
              "metadata alone", file=sys.stderr)
        text = f"---\nlanguage:\n- nl\nlicense: {DEFAULT_LICENSE}\nlibrary_name: transformers\n" \
               "pipeline_tag: text-generation\n---\n\n# A Dutch GPT-2 trained with gpt2-dutch\n"
    write_text_atomic(model_path / CARD, text)
    return model_path / CARD
