"""Our speed against the standard recipes, side by side in one run, next to this device's measured limits.

    gpt2-dutch bench                         # limits, preprocess, train, generate, serve, quality (~10 min + quality)
    gpt2-dutch bench train                   # one part: preprocess, train, generate, serve or quality
    gpt2-dutch bench serve                   # the API at 1, 4, 16 streaming clients vs one request at a time
    gpt2-dutch bench quality --seeds 2       # held-out bits per byte after 4 minutes of training, ours vs textbook
    gpt2-dutch bench quality --ours-config ablation.yaml   # the same, ours with other train settings
    gpt2-dutch bench quality --shape nano --tokens 2e7   # sample efficiency: ours vs a tuned AdamW peer, 2 seeds
    gpt2-dutch bench quality --budgets 2m,4m,12m         # the time-budget comparison at each budget, 2 seeds
    gpt2-dutch bench --quick                 # every part but quality and serve on small inputs in ~20 s (CI)
    gpt2-dutch bench --json-out b.json --markdown-out b.md --plot-out b.png

Each of our results is measured next to its baseline (gpt2_dutch/bench/baselines.py: run_clm.py's data path, a
run_clm-style fp32 Trainer, plain fp32 `model.generate`) on the same data in the same run and reported as a
ratio, so the figures hold on a noisy shared machine. Rates are also given as a fraction of the limit that
bounds them: the bare encoder for preprocessing (ours and the recipe's), the matmul peak of the dtype for
training (MFU), memory bandwidth for batch-1 decoding. `quality` gives both recipes the same --max-time of training
time and scores both on the same held-out documents in bits per byte (see gpt2_dutch/bench/quality.py);
`quality --shape` gives both the same shape and tokens and compares their curves (bench/sample_efficiency.py).
Text: --data-files FILE ..., else the built-in sample (small: pass a real corpus for figures worth quoting;
`make bench` passes the development corpus when the checkout has one).
Tokenizer: --tokenizer, else a Dutch BPE trained on that text before any timing.
The benchmark runs on one device: it sets CUDA_VISIBLE_DEVICES to the first visible GPU before CUDA starts.
"""

# This package measures the product from outside, through its public functions and what its runs publish;
# nothing in the product imports it. Its modules:
#     __init__.py          BenchConfig and bench(): choose the text, run the parts, write the report
#     limits.py            the machine and its limits: matmul peak per dtype, memory bandwidth
#     preprocess_speed.py  gpt2-dutch preprocess vs run_clm.py's data path, each in its own process ...
#     preprocess_child.py  ... the program each of those processes runs (python -m gpt2_dutch.bench.preprocess_child)
#     train_speed.py       gpt2-dutch train vs a run_clm-style Trainer, our speed read from the run's metrics.jsonl
#     generate_speed.py    our decoding vs plain fp32 model.generate
#     serve_speed.py       gpt2-dutch serve under concurrent streaming clients vs one request at a time
#     quality.py           held-out bits per byte after the same training time: ours vs a textbook Trainer run
#     sample_efficiency.py quality --shape: curves at a fixed shape and token count, ours vs a tuned AdamW peer
#     curves.py            the curves' arithmetic (when ours reaches the peer), their report section and plots
#     baselines.py         the standard recipes themselves
#     report.py            progress lines, ratios against targets, the table (screen, markdown) and the bar chart
# torch is imported only inside the parts, so that `gpt2-dutch bench --help` stays fast.

from __future__ import annotations

import gzip
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2_dutch import __version__
from gpt2_dutch.bench.serve_speed import SERVERS  # standard library only: cheap for the CLI's help
from gpt2_dutch.core.errors import UsageError, check
from gpt2_dutch.core.options import option

PARTS = ["all", "preprocess", "train", "generate", "serve", "quality"]
SHAPES = ["pico", "nano", "tiny", "small"]  # quality --shape: the presets a sample-efficiency run can afford
PEER_LRS = "1e-3,2e-3,4e-3"  # AdamW's usual range for 4-layer GPT-2s: 2e-3 in the middle, a factor 2 either side


@dataclass
class BenchConfig:
    part: str = option("all", "what to measure: all, preprocess, train, generate, serve or quality", positional=True,
                       choices=PARTS)
    quick: bool = option(False, "small inputs, the tiny model and few steps: every part in ~20 s (CI); `all` then "
                         "leaves quality and serve out, and `quality --quick` trains for 3 s per side unless "
                         "--max-time is given")
    data_files: list[str] = option([], "benchmark text: .jsonl(.gz) files with a 'text' field, globs allowed, "
                                   "repeatable, as preprocess takes them (several are measured as one text; "
                                   "default: the built-in sample)",
                                   aliases=["--data-file"])
    tokenizer: str | None = option(None, "tokenizer for every part (default: a Dutch BPE trained on the text)")
    output_dir: str = option("bench_results", "where bench.json, bench.md and bench.png are written")
    # Paths, not switches: elsewhere `--json` switches JSON output on, so these say where the file goes.
    json_out: str | None = option(None, "write the JSON results here instead", aliases=["--json"])
    markdown_out: str | None = option(None, "write the markdown table here instead", aliases=["--markdown"])
    plot_out: str | None = option(None, "write the bar chart of the ratios (PNG) here instead", aliases=["--plot"])
    max_time: str | None = option(None, "quality: training time per side, e.g. 4m, 90s (default 4m; 3s with --quick)",
                                  aliases=["--budget"])
    seeds: int | None = option(None, "quality: train each side with this many seeds (42, 43, ...); figures per "
                               "seed and means (default 1; 2 with --shape or --budgets)")
    shape: str | None = option(None, "quality: sample efficiency at this fixed shape instead of a time budget: ours "
                               "and a tuned AdamW peer (same shape, data, context and tokens per step) for --tokens "
                               "tokens, both scored at 8 points; the tokens at which ours reaches the peer's final "
                               "figure, over --tokens", choices=SHAPES)
    tokens: float | None = option(None, "quality --shape: training tokens per side (e.g. 2e7)")
    peer_lrs: str = option(PEER_LRS, "quality --shape: the peer's learning rates (comma-separated, at least "
                           "3); the one with the best final held-out figure on the first seed is used for all")
    budgets: str | None = option(None, "quality: several --max-time budgets, comma-separated (e.g. 2m,4m,12m): "
                                 "ours (--model-size auto) vs the textbook at each, one plot against seconds")
    servers: str = option(",".join(SERVERS), "serve: the servers to measure, comma-separated (ours is always one): "
                          + ", ".join(SERVERS))
    ours_config: str | None = option(None, "quality: a JSON or YAML file of train settings for our side (keys as in "
                                     "`train --config`, e.g. learning_rate: 3e-3), on top of --model-size auto: "
                                     "for ablations")
    ablation: list[str] = option([], "quality (repeatable): another variant of our side, a settings file like "
                                 "--ours-config ('defaults': nothing changed), trained with every seed on the same "
                                 "data; the baseline is trained once per seed for all of them")

    # derived in __post_init__: the budget in seconds and the checked settings of --ours-config
    budget_s: float = field(init=False, default=0.0)
    text_files: list = field(init=False, default_factory=list)  # --data-files with their globs expanded
    ours_overrides: dict = field(init=False, default_factory=dict)
    peer_lr_values: list = field(init=False, default_factory=list)
    budget_names: list = field(init=False, default_factory=list)
    server_names: tuple = field(init=False, default=SERVERS)
    ablation_variants: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        from gpt2_dutch.data.sources import expand_data_files

        self.text_files = expand_data_files(self.data_files, "--data-files") if self.data_files else []
        for path in self.text_files:
            check(path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")), f"--data-files {path}: the "
                  "run_clm baseline reads JSON lines; give a .jsonl or .jsonl.gz file with a 'text' field")
        from gpt2_dutch.bench.quality import ablation_variants, ours_overrides  # light: no torch until quality runs
        from gpt2_dutch.core.options import parse_duration

        self.budget_s = parse_duration(self.max_time or ("3s" if self.quick else "4m"))
        self._check_curve_modes()
        self.server_names = tuple(n.strip() for n in self.servers.split(",") if n.strip())
        unknown = [n for n in self.server_names if n not in SERVERS]
        check(not unknown, f"--servers: {', '.join(unknown)[:200]} is not a server the bench knows; choose from "
              f"{', '.join(SERVERS)}")
        check("ours" in self.server_names, "--servers must include ours: the ratios are ours over each of the others")
        if self.seeds is None:
            self.seeds = 2 if self.shape or self.budgets else 1
        check(1 <= self.seeds <= 100, f"--seeds must be between 1 and 100 (got {self.seeds})")
        if self.ours_config is not None:
            self.ours_overrides = ours_overrides(self.ours_config)
            if self.shape:
                from gpt2_dutch.bench.sample_efficiency import SET_BY_SHAPE

                fixed = [k for k in self.ours_overrides if k in SET_BY_SHAPE]
                check(not fixed, f"--ours-config {self.ours_config}: {', '.join(fixed)} is set by --shape (the shape, "
                      "and the checkpoints that make the curve); remove it from the file")
        self.ablation_variants = ablation_variants(self.ablation)
        names = [name for name, _, _ in self.ablation_variants]
        check(len(set(names)) == len(names), f"--ablation: two variants share a name ({', '.join(names)}); the "
              "file names (without extension) name them in the report")


    def _check_curve_modes(self) -> None:
        """--shape/--tokens/--peer-lrs and --budgets: quality's other two modes, each on its own."""
        from gpt2_dutch.core.options import parse_duration

        mode = "--shape" if self.shape else "--budgets" if self.budgets else None
        check(self.part == "quality" or (mode is None and self.tokens is None), f"{mode or '--tokens'} is for "
              "`gpt2-dutch bench quality`; run that part on its own")
        check(not (self.shape and self.budgets), "give --shape (a fixed shape and token count) or --budgets (time "
              "budgets), not both: they are two benchmarks")
        check(self.shape is None or self.tokens is not None, "--shape needs --tokens: the training tokens per side "
              "(e.g. --tokens 2e7)")
        check(self.tokens is None or self.shape is not None, "--tokens is for --shape (e.g. --shape nano --tokens "
              "2e7); a time budget is --max-time")
        check(mode is None or self.max_time is None, f"--max-time and {mode} do not go together: "
              + ("--shape trains for --tokens, not for a time" if self.shape else "--budgets lists the budgets"))
        check(mode is None or not self.ablation, f"--ablation is for the one-budget `bench quality`, not {mode}; "
              "use --ours-config for one variant")
        check(self.shape is not None or self.peer_lrs == PEER_LRS, "--peer-lrs is for --shape (the tuned AdamW "
              "peer); the textbook recipe keeps its learning rate")
        if self.tokens is not None:
            check(math.isfinite(self.tokens) and self.tokens >= 1, f"--tokens must be a positive number of tokens "
                  f"like 2e7 (got {self.tokens:g})")
        self.peer_lr_values = sorted(set(_numbers(self.peer_lrs, "--peer-lrs")))
        check(len(self.peer_lr_values) >= 3, f"--peer-lrs {self.peer_lrs}: the peer is tuned over at least 3 "
              "learning rates (e.g. 1e-3,2e-3,4e-3)")
        if self.budgets is not None:
            self.budget_names = [b.strip() for b in self.budgets.split(",") if b.strip()]
            check(bool(self.budget_names), "--budgets lists time budgets like 2m,4m,12m")
            check(len(set(self.budget_names)) == len(self.budget_names), f"--budgets {self.budgets}: a budget is "
                  "listed twice; give each once (--seeds repeats them)")
            for name in self.budget_names:
                parse_duration(name, "--budgets")


def _numbers(text: str, flag: str) -> list[float]:
    """'1e-3,2e-3' -> [0.001, 0.002]; one line naming `flag` for anything but positive finite numbers."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"{flag} {text}: {part.strip()!r} is not a number; give comma-separated learning "
                             "rates like 1e-3,2e-3,4e-3") from None
        check(math.isfinite(value) and value > 0, f"{flag} {text}: each value must be positive (got {part.strip()})")
        values.append(value)
    return values


def bench(cfg: BenchConfig) -> dict[str, Any]:
    from gpt2_dutch.data.sample import builtin_sample_path
    from gpt2_dutch.data.tokenizer import load_tokenizer

    if cfg.tokenizer:  # a bad --tokenizer is one line before any part runs, not a child process's traceback
        load_tokenizer(cfg.tokenizer)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    _use_one_device()
    try:
        return _bench(cfg, builtin_sample_path())
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _use_one_device() -> None:
    """Make only the first visible GPU visible, the standard CUDA way, so that every part measures one device in
    one process: `train` then sees one GPU (no torchrun relaunch, no Trainer DataParallel), as on a one-GPU box.

    CUDA reads the variable once, when it starts in this process; the preprocess children inherit it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = "0" if visible is None else visible.split(",")[0].strip()
    torch = sys.modules.get("torch")  # only a caller that already started CUDA can have made this too late
    if torch is not None and torch.cuda.is_initialized() and torch.cuda.device_count() > 1:
        raise UsageError("bench measures one GPU and limits itself to it with CUDA_VISIBLE_DEVICES, but CUDA "
                         f"already started in this process with {torch.cuda.device_count()} GPUs; run it in a "
                         "new process, or set CUDA_VISIBLE_DEVICES to one GPU first")
    os.environ["CUDA_VISIBLE_DEVICES"] = first


def _bench(cfg: BenchConfig, builtin: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpt2-dutch-bench-text-") as joined:
        if len(cfg.text_files) > 1:  # the run_clm baseline reads one JSON-lines file: the files as one text
            text = join_json_lines(cfg.text_files, Path(joined) / "bench_text.jsonl")
        elif cfg.text_files:
            text = cfg.text_files[0]
        else:
            text = builtin
        return _bench_text(cfg, text, ", ".join(map(str, cfg.text_files)) or str(text))


def _bench_text(cfg: BenchConfig, text: Path, shown: str) -> dict[str, Any]:
    from gpt2_dutch.bench.curves import curve_plot_path, extra_ratios, write_section
    from gpt2_dutch.bench.generate_speed import bench_generate
    from gpt2_dutch.bench.limits import machine_info, measure_limits
    from gpt2_dutch.bench.preprocess_speed import bench_preprocess, train_bench_tokenizer
    from gpt2_dutch.bench.report import ratios, say, write_outputs
    from gpt2_dutch.bench.serve_speed import bench_serve
    from gpt2_dutch.bench.train_speed import bench_train

    parts = PARTS[1:] if cfg.part == "all" else [cfg.part]
    if cfg.part == "all" and cfg.quick:
        # quality trains two models and scores both: ~25 s more even at its 3 s budget, which would double the
        # quick run; `bench quality --quick` (and tests/e2e/test_bench.py) runs it on its own
        parts.remove("quality")
        parts.remove("serve")  # two server processes to start: ~20 s more; `bench serve --quick` runs it alone
    results: dict[str, Any] = {"version": __version__, "quick": cfg.quick, "machine": machine_info(),
                               "text": {"file": shown, "mb": text_megabytes(text)}}
    say(f"device limits ({results['machine']['device']})")
    results["limits"] = measure_limits(cfg.quick)
    with tempfile.TemporaryDirectory(prefix="gpt2-dutch-bench-") as tmp_name:
        tmp = Path(tmp_name)
        speed_parts = [p for p in parts if p != "quality"]  # quality trains its own, on its training documents
        tokenizer = cfg.tokenizer or (train_bench_tokenizer(text, tmp / "tokenizer", 4096 if cfg.quick else 32768)
                                      if speed_parts else "")
        results["tokenizer"] = cfg.tokenizer or "Dutch BPE trained on the benchmark text"
        if "preprocess" in parts:
            say("preprocess: gpt2-dutch vs the run_clm.py recipe")
            results["preprocess"] = bench_preprocess(text, results["text"]["mb"], tokenizer, tmp, cfg.quick)
        if "train" in parts:
            results["train"] = bench_train(text, tokenizer, tmp, cfg.quick, results["limits"])
        if "generate" in parts:
            say("generate: gpt2-dutch vs plain fp32 model.generate")
            results["generate"] = bench_generate(tokenizer, tmp, cfg.quick, results["limits"])
        if "serve" in parts:
            say("serve: gpt2-dutch serve, streaming clients at once vs one request at a time")
            results["serve"] = bench_serve(tokenizer, tmp, cfg.quick, cfg.server_names)
        if "quality" in parts:
            _run_quality(cfg, text, tmp, results)
    results["ratios"] = {**ratios(results), **extra_ratios(results)}
    out = Path(cfg.output_dir)
    paths = {"json": Path(cfg.json_out or out / "bench.json"), "markdown": Path(cfg.markdown_out or out / "bench.md"),
             "plot": Path(cfg.plot_out or out / "bench.png")}
    mode = next((k for k in ("sample_efficiency", "quality_budgets") if k in results), None)
    if mode:
        results[mode]["plot"] = str(curve_plot_path(paths["json"]))
    write_outputs(results, paths)
    if mode:
        write_section(results, paths["markdown"], Path(results[mode]["plot"]))
    return results


def _run_quality(cfg: BenchConfig, text: Path, tmp: Path, results: dict[str, Any]) -> None:
    from gpt2_dutch.bench.quality import bench_quality, bench_quality_budgets
    from gpt2_dutch.bench.sample_efficiency import bench_sample_efficiency

    if cfg.shape:
        results["sample_efficiency"] = bench_sample_efficiency(
            text, cfg.tokenizer, tmp, cfg.quick, cfg.shape, cfg.tokens, cfg.seeds, cfg.peer_lr_values,
            cfg.ours_config, cfg.ours_overrides)
    elif cfg.budget_names:
        results["quality_budgets"] = bench_quality_budgets(text, cfg.tokenizer, tmp, cfg.quick, cfg.budget_names,
                                                           cfg.seeds, cfg.ours_config, cfg.ours_overrides)
    else:
        results["quality"] = bench_quality(text, cfg.tokenizer, tmp, cfg.quick, cfg.budget_s, cfg.seeds,
                                           cfg.ours_config, cfg.ours_overrides, cfg.ablation_variants)


def join_json_lines(files: list[Path], out: Path) -> Path:
    """The JSON lines of `files` (each optionally gzipped), in order, as one plain .jsonl file at `out`."""
    with open(out, "wb") as dst:
        for path in files:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as src:
                for line in src:
                    if line.strip():
                        dst.write(line.rstrip(b"\r\n") + b"\n")
    return out


def text_megabytes(path: Path) -> float:
    from gpt2_dutch.data.sources import iter_file_texts  # a bad line is one line naming it, not a traceback

    return sum(len(text.encode("utf-8")) for text in iter_file_texts(path)) / 1e6
