"""Preprocessing throughput: `gpt2-dutch preprocess` vs the transformers run_clm.py recipe, side by side.

    .venv/bin/python scripts/bench_preprocess.py [--data FILE] [--tokenizer DIR] [--json OUT]

Both run in their own process on the same text with the same tokenizer; text MB/s is UTF-8 bytes of text
over end-to-end wall time (imports excluded), peak memory is the process's max RSS. Also shows that peak memory
in streaming mode does not grow with the data (1x vs 10x the text). Defaults: ../shared/data/dutch and the
offline English GPT-2 BPE when present, else the built-in sample and a Dutch BPE trained on it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# The baseline, kept apart from the product: transformers' examples/pytorch/language-modeling/run_clm.py
# (load_dataset -> map(tokenize) -> map(group_texts) -> save_to_disk), block size 1024, default single process.
RECIPE = r'''
import sys, time, json
from itertools import chain
from datasets import load_dataset
from transformers import AutoTokenizer, GPT2TokenizerFast
data, tok_dir, out, cache = sys.argv[1:5]
import os
tok = (GPT2TokenizerFast(vocab=f"{tok_dir}/vocab.json", merges=f"{tok_dir}/merges.txt")
       if os.path.exists(f"{tok_dir}/vocab.json") else AutoTokenizer.from_pretrained(tok_dir))
t0 = time.perf_counter()
raw = load_dataset("json", data_files=data, cache_dir=cache)
cols = raw["train"].column_names
tokenized = raw.map(lambda ex: tok(ex["text"]), batched=True, remove_columns=cols)
block = 1024
def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total = len(concatenated[list(examples.keys())[0]]) // block * block
    result = {k: [t[i:i + block] for i in range(0, total, block)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result
lm = tokenized.map(group_texts, batched=True)
lm.save_to_disk(out)
import resource
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

OURS = r'''
import sys, time, json, resource
from gpt2_dutch.preprocess import PreprocessConfig, preprocess
data, tok_dir, out = sys.argv[1:4]
t0 = time.perf_counter()
path = preprocess(PreprocessConfig(data_files=[data], tokenizer=tok_dir, output_dir=out, name="d", streaming=True))
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "bytes_on_disk": sum(f.stat().st_size for f in (path / "train").glob("*.arrow"))
                                   + sum(f.stat().st_size for f in (path / "test").glob("*.arrow")),
                  "tokens": sum(s["tokens"] for s in json.load(open(path / "manifest.json"))["splits"].values()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def run(code: str, *args: str) -> dict:
    """Run one side in a fresh process; it reports its own wall time and peak RSS."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "dutch" / "train.jsonl.gz"))
    ap.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_file():
        data = ROOT / "src" / "gpt2_dutch" / "sample" / "dutch_sample.jsonl"
    opener = gzip.open if data.suffix == ".gz" else open
    with opener(data, "rt", encoding="utf-8") as f:
        text_mb = sum(len(json.loads(line)["text"].encode()) for line in f if line.strip()) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ten = t / "ten.jsonl.gz"  # 10x the text: gzip members concatenate into one valid stream
        ten.write_bytes(data.read_bytes() * 10 if data.suffix == ".gz" else gzip.compress(data.read_bytes() * 10))
        ours = run(OURS, str(data), args.tokenizer, str(t / "ours"))
        recipe = run(RECIPE, str(data), args.tokenizer, str(t / "recipe"), str(t / "cache"))
        ours10 = run(OURS, str(ten), args.tokenizer, str(t / "ours10"))
    res = {
        "data": str(data), "text_mb": text_mb, "tokenizer": args.tokenizer,
        "ours_mb_per_s": text_mb / ours["seconds"], "recipe_mb_per_s": text_mb / recipe["seconds"],
        "speedup": recipe["seconds"] / ours["seconds"], "ours_bytes_per_token": ours["bytes_on_disk"] / ours["tokens"],
        "ours_peak_rss_mb": ours["peak_rss_mb"], "recipe_peak_rss_mb": recipe["peak_rss_mb"],
        "ours_10x_mb_per_s": 10 * text_mb / ours10["seconds"], "ours_10x_peak_rss_mb": ours10["peak_rss_mb"],
    }
    print(f"text: {text_mb:.1f} MB from {data}")
    print(f"{'':<28}{'MB/s':>8}{'peak RSS MB':>13}")
    print(f"{'run_clm recipe':<28}{res['recipe_mb_per_s']:>8.2f}{res['recipe_peak_rss_mb']:>13.0f}")
    print(f"{'gpt2-dutch preprocess':<28}{res['ours_mb_per_s']:>8.2f}{res['ours_peak_rss_mb']:>13.0f}")
    print(f"{'gpt2-dutch, 10x the text':<28}{res['ours_10x_mb_per_s']:>8.2f}{res['ours_10x_peak_rss_mb']:>13.0f}")
    print(f"speed-up {res['speedup']:.2f}x; {res['ours_bytes_per_token']:.2f} bytes per stored token")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
