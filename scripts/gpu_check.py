"""One command that checks the CUDA paths on one GPU and writes one JSON + markdown report (issue #27).

    scripts/gpu_check.sh                       # on a CUDA machine: installs the carried wheels, then this
    scripts/gpu_check.sh --dry-run             # the same checks on CPU, tiny shapes, seconds (what CI runs)
    python scripts/gpu_check.py --corpus FILE --out-dir DIR --total-budget 430s

Every check is a row (ok / failed / skipped, a one-line reason, its figures); a failure never stops the others.
The checks use the product's own commands, each in its own process where a crash could take the rest down:
    environment  torch, CUDA, driver, GPU, bf16 support, the measured matmul peaks (bench.limits), first
    data         `preprocess` of the corpus at the seed's context (1024 tokens)
    train        `train --model-size small` in bf16 for a fixed --max-time: eager, --compile, the model's own loss
                 (--loss-chunk-tokens 0), the fused kernel (liger-kernel when carried), --optimizer adamw;
                 tokens/s, MFU of the measured bf16 peak, peak memory, the first step's loss
    distributed  `torchrun --nproc-per-node 1 ... train`: NCCL, a run stopped by SIGTERM and resumed ends with the
                 weights of an uninterrupted one (a second uninterrupted run says how far the GPU's own
                 nondeterminism goes); `train --fsdp` with one rank saves its final model
    generate     `generate --benchmark` at batch 1 and 16 on the eager run's model
    serve        `serve` with 1, then 16 streaming clients on loopback
    quality      `bench quality` on the corpus with the time left (at most 2 minutes per side)
On a machine without CUDA (or with --dry-run) the same checks run on CPU with tiny shapes and short budgets,
the independent ones at once; the figures then only show that each path runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
DEFAULT_CORPORA = (ROOT / "wheels" / "corpus.jsonl.gz", ROOT.parent / "shared" / "data" / "dutch" / "train.jsonl.gz")
MARKER = ".gpu_check"  # in --out-dir: the folder is the check's own, its work/ and logs/ are replaced each time
WARMUP_STEPS = 3  # the first steps allocate (and with --compile, compile): not counted in tokens/s

# Shapes and budgets: on the GPU the seed's shape; on CPU (--dry-run) the smallest that still runs every path.
GPU = {"vocab": 32768, "chunk": 1024, "size": "small", "batch": 16, "precision": "bf16",
       # --compile's first steps compile (tens of seconds), which a --max-time budget would count: steps there
       "budgets": {"eager": "20s", "own_loss": "10s", "adamw": "10s", "compile": 300, "fused": "10s"},
       "dist_size": "tiny", "dist_batch": 8, "dist_steps": 300, "dist_save": 100, "dist_stop_at": 100,
       "fsdp_steps": 20, "new_tokens": 128, "serve_tokens": 64, "serve_requests": 2,
       "quality_max_side_s": 120, "quality_min_side_s": 20, "quality_overhead_s": 60, "child_slack_s": 240,
       "row_limit_s": 150}
DRY = {"vocab": 400, "chunk": 64, "size": "pico", "batch": 2, "precision": "fp32",
       "budgets": {"eager": "1s", "own_loss": "1s", "adamw": "1s", "compile": 10, "fused": "1s"},
       "dist_size": "pico", "dist_batch": 2, "dist_steps": 80, "dist_save": 20, "dist_stop_at": 10,
       "fsdp_steps": 4, "new_tokens": 8, "serve_tokens": 4, "serve_requests": 1,
       "quality_max_side_s": 3, "quality_min_side_s": 1, "quality_overhead_s": 0, "child_slack_s": 240,
       "row_limit_s": 120}
# --tiny on a GPU: bf16, and runs long enough (steps of a few ms) to be stopped mid-way
TINY_ON_GPU = {"precision": "bf16", "dist_steps": 300, "dist_save": 100, "dist_stop_at": 100}
# torch.compile on a CPU spends half a minute compiling C++ for the smallest model: the dry run leaves it out
DRY_LEFT_OUT = {"compile": "--compile is left out of the dry run (inductor's C++ build on a CPU takes ~30 s); "
                           "it runs on the GPU"}
ROW_ORDER = ["install the carried wheels", "environment", "data: preprocess", "train", *(f"train {n}" for n in (
    "eager", "own_loss", "adamw", "compile", "fused")), "loss: model's own vs chunked", "loss: fused vs chunked",
    "optimizer: adamw vs muon", "--compile vs eager", "generate --benchmark", "serve, 16 streaming clients",
    "torchrun", "torchrun: NCCL, stop and exact resume", "torchrun --fsdp, one rank", "bench quality"]
TRAIN_ROWS = [  # (row, flags); compile last but one (the likeliest to crash its process), fused last (it changes
    # what the process imports: the others must train with the chunked loss)
    ("eager", []), ("own_loss", ["--loss-chunk-tokens", "0"]), ("adamw", ["--optimizer", "adamw"]),
    ("compile", ["--compile"]), ("fused", [])]


def first_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:limit]


class Report:
    """The rows so far; each check adds its own, also when it fails."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, check: str, status: str, reason: str = "", figures: dict[str, Any] | None = None,
            seconds: float | None = None) -> dict[str, Any]:
        row = {"check": check, "status": status, "reason": reason, "figures": figures or {},
               "seconds": None if seconds is None else round(seconds, 2)}
        with self.lock:
            self.rows.append(row)
        mark = {"ok": "ok    ", "failed": "FAILED", "skipped": "skip  "}[status]
        print(f"gpu_check: {mark} {check}" + (f": {reason}" if reason else ""), file=sys.stderr, flush=True)
        return row

    def row(self, check: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["check"] == check), None)


def checked(report: Report, check: str):  # noqa: ANN201 - a decorator
    """Run fn as the check `check`: its exception becomes a failed row with its one-line reason."""
    def wrap(fn):  # noqa: ANN001, ANN202
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every failure is a row, never the end of the check
                report.add(check, "failed", f"{type(e).__name__}: {first_line(str(e)) if str(e) else ''}",
                           seconds=time.monotonic() - start)
                traceback.print_exc()
                return None
        return run
    return wrap


# ---------------------------------------------------------------------------------------------------------- runner

class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.tiny = self.dry or args.tiny  # the dry run's shapes, also on a GPU (a smoke test)
        self.shape = GPU if not self.tiny else DRY if self.dry else {**DRY, **TINY_ON_GPU}
        self.work = Path(args.out_dir).resolve() / "work"
        self.logs = Path(args.out_dir).resolve() / "logs"
        for ours in (self.work, self.logs):  # the last check's, in a folder that claim_out_dir says is ours
            shutil.rmtree(ours, ignore_errors=True)
            ours.mkdir(parents=True)
        self.report = Report()
        self.deadline = time.monotonic() + args.total_budget_s
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                                  if p)}
        if self.dry:  # several children share the CPU at once
            self.env.setdefault("OMP_NUM_THREADS", "1")
        else:
            self.env["NCCL_DEBUG"] = "VERSION"  # NCCL prints its version when a communicator starts
        self.peaks: dict[str, float] = {}
        self.dataset: Path | None = None
        self.runs: dict[str, Path] = {}

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def python(self, *argv: str) -> list[str]:
        return [sys.executable, *argv]

    def torchrun(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *argv]

    def spawn(self, name: str, cmd: list[str], timeout: float,
              stalled: Any = None) -> subprocess.CompletedProcess:
        """cmd with its output in logs/NAME.log; a timeout (or `stalled()` saying why) is the child's failure,
        not ours: its process group is killed."""
        log = self.logs / f"{name}.log"
        deadline = time.monotonic() + max(1.0, timeout)
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                    start_new_session=True)
            why = None
            while proc.poll() is None and why is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)
                if proc.poll() is None:
                    why = (f"ran past its {timeout:.0f} s limit" if time.monotonic() > deadline
                           else stalled() if stalled else None)
            if why is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(f"{name} {why} (log: {log})")
        return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(errors="replace"), "")

    # ------------------------------------------------------------------------------------------------- checks
    def environment(self) -> None:
        start = time.monotonic()
        import torch

        from gpt2_dutch.bench.limits import machine_info, measure_limits

        cuda = torch.cuda.is_available()
        figures: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None,
                                   "python": machine_info()["python"], "cpu": machine_info()["cpu"]}
        if cuda:
            props = torch.cuda.get_device_properties(0)
            figures.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                           gpu_memory_gb=round(props.total_memory / 2**30, 1),
                           bf16_supported=torch.cuda.is_bf16_supported(), driver=nvidia_smi_driver())
        else:
            figures["bf16_supported"] = None
        limits = measure_limits(quick=self.dry)
        if cuda:  # the children measure memory: this process keeps none of its cache
            torch.cuda.empty_cache()
        self.peaks = limits["matmul_flops"]
        figures.update({f"matmul_{k}_tflops": round(v / 1e12, 3) for k, v in self.peaks.items()},
                       matmul_size=limits["matmul_size"], copy_gb_per_s=round(limits["copy_bytes_per_s"] / 1e9, 1),
                       read_gb_per_s=round(limits["read_bytes_per_s"] / 1e9, 1))
        ok = cuda and figures["bf16_supported"] or self.dry
        self.report.add("environment", "ok" if ok else "failed",
                        "" if ok else "no CUDA GPU with bf16 found (run with --dry-run on CPU)", figures,
                        time.monotonic() - start)

    def data(self) -> None:
        start = time.monotonic()
        from gpt2_dutch.__main__ import command_config, command_parser
        from gpt2_dutch.data.chunks import read_manifest
        from gpt2_dutch.preprocess import preprocess

        argv = ["--data-files", str(self.args.corpus), "--chunk-size", str(self.shape["chunk"]), "--vocab-size",
                str(self.shape["vocab"]), "--output-dir", str(self.work / "data"), "--name", "corpus", "--overwrite"]
        with contextlib.redirect_stdout(sys.stderr):
            self.dataset = preprocess(command_config("preprocess", command_parser("preprocess").parse_args(argv)))
        splits = read_manifest(self.dataset)["splits"]
        self.report.add("data: preprocess", "ok", "", {
            "corpus": str(self.args.corpus), "text_mb": round(sum(s["bytes"] for s in splits.values()) / 1e6, 2),
            "context": self.shape["chunk"], "vocab": self.shape["vocab"],
            "train_chunks": splits["train"]["chunks"]}, time.monotonic() - start)

    def train_flags(self, size: str, batch: int) -> list[str]:
        return ["--dataset-path", str(self.dataset), "--model-size", size, "--batch-size", str(batch),
                "--precision", self.shape["precision"], "--warmup", "0", "--keep-checkpoints", "1",
                "--eval-chunks", str(batch), "--quiet"]

    def train_rows(self) -> None:
        """Each row's `train` in one child process (the libraries imported once); a child that dies takes only
        the row it was in: the next child starts with the rows after it."""
        if self.dataset is None:
            for name, _ in TRAIN_ROWS:
                self.report.add(f"train {name}", "failed", "no dataset: the data check failed")
            return
        s = self.shape
        specs = []
        for name, flags in TRAIN_ROWS:
            if self.dry and name in DRY_LEFT_OUT:
                continue
            budget = s["budgets"][name]
            length = ["--max-steps", str(budget)] if isinstance(budget, int) else ["--max-time", budget]
            argv = [*self.train_flags(s["size"], s["batch"]), *length,
                    "--log-every", "1", "--eval-every", "1000000", "--save-every", "1000000",
                    "--output-dir", str(self.work / f"train-{name}"), *flags]
            specs.append({"name": name, "argv": argv, "fused_site": self.args.fused_site if name == "fused" else None})
        results: dict[str, dict[str, Any]] = {}
        todo = specs
        attempt = 0
        while todo:
            attempt += 1
            spec_file, out_file = self.work / f"train-rows-{attempt}.json", self.work / f"train-rows-{attempt}.jsonl"
            spec_file.write_text(json.dumps(todo))
            limit = s["child_slack_s"] * len(todo)
            error = ""
            began: dict[str, float] = {}

            def stalled(out_file: Path = out_file, began: dict[str, float] = began) -> str | None:
                """A row past its own limit: the next child takes the rows after it."""
                lines = out_file.read_text().splitlines() if out_file.exists() else []
                row = json.loads(lines[-1]).get("start") if lines else None
                if row is None:
                    return None
                began.setdefault(row, time.monotonic())
                late = time.monotonic() - began[row] > s["row_limit_s"]
                return f"spent over {s['row_limit_s']} s in train {row}" if late else None

            try:
                r = self.spawn(f"train-rows-{attempt}", self.python(str(SCRIPT), "--child-train", str(spec_file),
                                                                   str(out_file)), min(limit, self.left_s()),
                               stalled)
                error = f"the train process exited with {r.returncode}: {first_line(r.stdout)}"
            except TimeoutError as e:
                error = str(e)
            lines = [json.loads(x) for x in out_file.read_text().splitlines()] if out_file.exists() else []
            started = [x["start"] for x in lines if "start" in x]
            for x in lines:
                if "name" in x:
                    results[x["name"]] = x
            done = [t for t in todo if t["name"] in results]
            if started and started[-1] not in results:  # the row it died in
                results[started[-1]] = {"name": started[-1], "error": error}
            todo = [t for t in todo if t["name"] not in results]
            if not done and not started:  # died before any row: the rest cannot fare better
                for t in todo:
                    results[t["name"]] = {"name": t["name"], "error": error}
                todo = []
        for name, _ in TRAIN_ROWS:
            if name in results:
                self.train_row(name, results[name])
            else:
                self.report.add(f"train {name}", "skipped", DRY_LEFT_OUT[name])
        self.train_comparisons()

    def train_row(self, name: str, result: dict[str, Any]) -> None:
        from gpt2_dutch.runs.records import metric_kind, read_metrics, read_run_config

        check = f"train {name}"
        if "error" in result:
            self.report.add(check, "failed", result["error"], seconds=result.get("seconds"))
            return
        run = Path(result["run"])
        self.runs[name] = run
        info = read_run_config(run)
        losses = [r for r in read_metrics(run) if metric_kind(r) == "train"]
        records = [r for r in losses if r.get("tokens_per_s")]  # step 1 has none: no record before it to time from
        timed = [r for r in records if r["step"] > WARMUP_STEPS] or records
        tps = info["tokens_per_step"] / statistics.median(info["tokens_per_step"] / r["tokens_per_s"] for r in timed)
        peak = self.peaks.get(info["precision"]) or self.peaks.get("fp32")
        figures = {
            "model_size": info["model_size"], "parameters": info["parameters"], "context": info["context"],
            "batch": info["batch_size"], "precision": info["precision"], "optimizer": info["optimizer"],
            "compile": info["compile"], "loss": result.get("loss_kernel"), "steps": records[-1]["step"],
            "tokens_per_s": round(tps), "step_ms": round(1000 * info["tokens_per_step"] / tps, 2),
            "mfu": round(tps * info["flops_per_token"] / peak, 4) if peak else None,
            "peak_gpu_memory_gb": result.get("peak_gpu_memory_gb"), "first_loss": losses[0]["loss"],
            "last_loss": losses[-1]["loss"]}
        status, reason = "ok", ""
        if name == "fused":
            if figures["loss"] not in ("liger_kernel", "cut_cross_entropy"):
                status = "skipped" if self.dry else "failed"
                reason = ("fused kernels run on CUDA tensors only: this row trained with the chunked loss"
                          if self.dry else f"no fused kernel was used ({result.get('fused_import_error') or 'none'})")
        elif name != "own_loss" and figures["loss"] != "chunked":
            status, reason = "failed", f"expected the chunked loss, got {figures['loss']}"
        self.report.add(check, status, reason, figures, result.get("seconds"))

    def train_comparisons(self) -> None:
        """Rows that compare the train rows: the losses agree on the first step (same seed, data and weights),
        and the ratios of speed and memory."""
        rows = {n: self.report.row(f"train {n}") for n, _ in TRAIN_ROWS}
        figs = {n: r["figures"] for n, r in rows.items() if r and r["status"] == "ok"}
        pairs = [("loss: model's own vs chunked", "own_loss", "eager"), ("loss: fused vs chunked", "fused", "eager"),
                 ("optimizer: adamw vs muon", "adamw", "eager"), ("--compile vs eager", "compile", "eager")]
        for check, a, b in pairs:
            if a not in figs or b not in figs:
                skipped = any(rows[n] and rows[n]["status"] == "skipped" for n in (a, b))
                self.report.add(check, "skipped" if skipped else "failed", f"needs train {a} and train {b}, both ok")
                continue
            fa, fb = figs[a], figs[b]
            diff = abs(fa["first_loss"] - fb["first_loss"]) / fb["first_loss"]
            ma, mb = fa["peak_gpu_memory_gb"], fb["peak_gpu_memory_gb"]
            figures = {"speed_ratio": round(fa["tokens_per_s"] / fb["tokens_per_s"], 3),
                       "step_ms": [fa["step_ms"], fb["step_ms"]], "first_loss": [fa["first_loss"], fb["first_loss"]],
                       "first_loss_rel_diff": round(diff, 5),
                       "peak_gpu_memory_gb": [ma, mb], "memory_ratio": round(ma / mb, 3) if ma and mb else None}
            # the first step's loss is the same computation in another kernel (or another optimizer, which has
            # not stepped yet): bf16 rounding, not 1%
            ok = diff < 0.01
            self.report.add(check, "ok" if ok else "failed",
                            "" if ok else f"the first step's losses differ by {100 * diff:.2f}%", figures)

    def distributed(self) -> None:
        """torchrun with one rank: NCCL, SIGTERM -> checkpoint -> --resume ends where an uninterrupted run does;
        then --fsdp with one rank."""
        if self.dataset is None:
            self.report.add("torchrun: NCCL, stop and exact resume", "failed", "no dataset: the data check failed")
            self.report.add("torchrun --fsdp, one rank", "failed", "no dataset: the data check failed")
            return
        # correctness, not speed: the one-rank FSDP run goes beside the resume check's runs
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(checked(self.report, "torchrun: NCCL, stop and exact resume")(self.resume_check)),
                    pool.submit(checked(self.report, "torchrun --fsdp, one rank")(self.fsdp_check))]
            for job in jobs:
                job.result()

    def dist_train(self, name: str, out: Path, *extra: str) -> list[str]:
        s = self.shape
        return self.torchrun(str(SCRIPT), "--child-command", str(self.work / f"{name}.json"), "--", "train",
                             *self.train_flags(s["dist_size"], s["dist_batch"]), "--max-steps", str(s["dist_steps"]),
                             "--save-every", str(s["dist_save"]), "--eval-every", str(s["dist_steps"]),
                             "--log-every", "1", "--output-dir", str(out), *extra)

    def resume_check(self) -> None:
        start = time.monotonic()
        s = self.shape
        limit = min(300.0, self.left_s())
        straight, control, stopped = (self.work / f"dist-{n}" for n in ("straight", "control", "stopped"))
        jobs = {"straight": self.dist_train("dist-straight", straight),
                "stopped": self.dist_train("dist-stopped", stopped)}
        if not self.dry:  # CPU training repeats bit for bit; on a GPU a second run measures its noise
            jobs["control"] = self.dist_train("dist-control", control)
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = {n: pool.submit(self.spawn, f"dist-{n}", cmd, limit) for n, cmd in jobs.items()
                       if n != "stopped"}
            stop_step = self.stop_when(stopped, s["dist_stop_at"], jobs["stopped"], limit)
            results = {n: f.result() for n, f in futures.items()}
        for n, r in results.items():
            if r.returncode != 0:
                raise RuntimeError(f"the {n} run exited with {r.returncode}: {first_line(r.stdout)}")
        run_b = one_run(stopped)
        from gpt2_dutch.runs.records import checkpoints_of, read_run_config, run_status

        status_b = run_status(run_b)
        checkpoints = [c.name for c in checkpoints_of(run_b)]
        if status_b != "stopped" or not checkpoints:
            raise RuntimeError(f"the run sent SIGTERM at step {stop_step} is {status_b} with checkpoints "
                               f"{checkpoints or 'none'}; expected stopped with a checkpoint")
        r = self.spawn("dist-resumed", self.dist_train("dist-resumed", stopped, "--resume", str(run_b)), limit)
        if r.returncode != 0:
            raise RuntimeError(f"--resume exited with {r.returncode}: {first_line(r.stdout)}")
        child = json.loads((self.work / "dist-resumed.json").read_text())
        diff = max_weight_diff(one_run(straight), run_b)
        noise = max_weight_diff(one_run(straight), one_run(control)) if "control" in jobs else 0.0
        nccl = [line.strip() for line in r.stdout.splitlines() if "NCCL version" in line][:1]
        figures = {"backend": child.get("backend"), "world_size": read_run_config(run_b).get("world_size"),
                   "nccl": nccl[0].split("NCCL version", 1)[1].strip() if nccl else None,
                   "sigterm_at_step": stop_step, "checkpoints": checkpoints, "resumed_status": run_status(run_b),
                   "max_weight_diff_vs_uninterrupted": diff, "max_weight_diff_two_uninterrupted": noise}
        problems = []
        if not self.dry and "nccl" not in str(figures["backend"]):
            problems.append(f"the process group's backend is {figures['backend']}, not nccl")
        if figures["resumed_status"] != "finished":
            problems.append(f"the resumed run is {figures['resumed_status']}")
        if diff > max(1e-5, 4 * noise):
            problems.append(f"the resumed weights differ from the uninterrupted run's by {diff:.3g} (two "
                            f"uninterrupted runs: {noise:.3g})")
        self.report.add("torchrun: NCCL, stop and exact resume", "failed" if problems else "ok", "; ".join(problems),
                        figures, time.monotonic() - start)

    def stop_when(self, out: Path, step: int, cmd: list[str], limit: float) -> int:
        """Start cmd, SIGTERM it (torchrun forwards it to its rank) once its metrics reach `step`, wait."""
        log = open(self.logs / "dist-stopped.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                start_new_session=True)
        deadline, reached = time.monotonic() + limit, None
        try:
            while reached is None and proc.poll() is None and time.monotonic() < deadline:
                reached = last_step(out, step)
                time.sleep(0.02)
            if reached is None:
                raise RuntimeError(f"the run to stop {'ended' if proc.poll() is not None else 'did not reach'} "
                                   f"step {step} before the signal (log: {log.name})")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        return reached

    def fsdp_check(self) -> None:
        start = time.monotonic()
        from safetensors import safe_open

        from gpt2_dutch.runs.records import read_run_config, run_status

        s, out = self.shape, self.work / "dist-fsdp"
        cmd = self.torchrun(str(SCRIPT), "--child-command", str(self.work / "dist-fsdp.json"), "--", "train",
                            *self.train_flags(s["dist_size"], s["dist_batch"]), "--fsdp", "--max-steps",
                            str(s["fsdp_steps"]), "--save-every", str(s["fsdp_steps"] // 2), "--log-every", "1",
                            "--output-dir", str(out))
        r = self.spawn("dist-fsdp", cmd, min(300.0, self.left_s()))
        if r.returncode != 0:
            raise RuntimeError(f"train --fsdp exited with {r.returncode}: {first_line(r.stdout)}")
        run = one_run(out)
        weights = run / "final_model" / "model.safetensors"
        with safe_open(str(weights), "pt") as f:
            numel = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
        info = read_run_config(run)
        figures = {"status": run_status(run), "optimizer": info.get("optimizer"), "world_size": info.get("world_size"),
                   "saved_parameters": numel, "parameters": info.get("parameters"),
                   "backend": json.loads((self.work / "dist-fsdp.json").read_text()).get("backend")}
        ok = figures["status"] == "finished" and numel >= (info.get("parameters") or 0)
        self.report.add("torchrun --fsdp, one rank", "ok" if ok else "failed",
                        "" if ok else "the final model is not complete", figures, time.monotonic() - start)

    def model_for_decoding(self) -> Path:
        for name in ("eager", "own_loss", "adamw", "compile", "fused"):
            run = self.runs.get(name)
            if run is not None and (run / "final_model" / "model.safetensors").is_file():
                return run / "final_model"
        raise RuntimeError("no trained model to decode with: every train row failed")

    def generate(self) -> None:
        start = time.monotonic()
        model = self.model_for_decoding()
        cmd = self.python("-m", "gpt2_dutch", "generate", "--model-path", str(model), "--benchmark",
                          "--benchmark-batch", "16", "--max-new-tokens", str(self.shape["new_tokens"]), "--precision",
                          self.shape["precision"], "--json")
        r = self.spawn("generate", cmd, min(300.0, self.left_s()))
        if r.returncode != 0:
            raise RuntimeError(f"generate --benchmark exited with {r.returncode}: {first_line(r.stdout)}")
        out = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
        figures = {"device": out["device"], "dtype": out["dtype"], "parameters": out["parameters"],
                   "new_tokens": out["new_tokens"],
                   "batch1_tokens_per_s": round(out["batch_1"]["tokens_per_s"], 1),
                   "batch16_tokens_per_s": round(out["batch_16"]["tokens_per_s"], 1),
                   "batch16_over_batch1": round(out["batch_speedup"], 2),
                   "ttft_ms": round(out["batch_1"]["ttft_ms"], 2),
                   "latency_p50_ms": round(out["batch_1"]["latency_p50_ms"], 2)}
        ok = self.dry or figures["device"].startswith("cuda")
        self.report.add("generate --benchmark", "ok" if ok else "failed",
                        "" if ok else f"decoded on {figures['device']}, not CUDA", figures, time.monotonic() - start)

    def serve(self) -> None:
        from gpt2_dutch.bench.serve_speed import free_port, load, wait_healthy

        start = time.monotonic()
        model = self.model_for_decoding()
        port = free_port()
        log = open(self.logs / "serve.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(self.python("-m", "gpt2_dutch", "serve", "--model-path", str(model), "--port",
                                            str(port), "--max-queue", "1000", "--precision",
                                            self.shape["precision"]),
                                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + min(180.0, max(5.0, self.left_s()))
            while True:  # wait_healthy in short rounds: a server that exits is seen at once
                if proc.poll() is not None:
                    log.flush()
                    raise RuntimeError(f"serve exited with {proc.returncode}: "
                                       f"{first_line((self.logs / 'serve.log').read_text(errors='replace'))}")
                try:
                    wait_healthy(port, None, timeout=1)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
            tokens, per_client = self.shape["serve_tokens"], self.shape["serve_requests"]
            load(port, 1, 1, tokens, {"ignore_eos": True})  # warm-up
            one = load(port, 1, per_client, tokens, {"ignore_eos": True})
            many = load(port, 16, per_client, tokens, {"ignore_eos": True})
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        figures = {"max_tokens": tokens, "requests_per_client": per_client,
                   "clients1_tokens_per_s": round(one["tokens_per_s"], 1),
                   "clients16_tokens_per_s": round(many["tokens_per_s"], 1),
                   "clients16_over_1": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
                   "clients16_ttft_p50_ms": round(many["ttft_p50_ms"], 1),
                   "clients16_latency_p50_s": round(many["latency_p50_s"], 3),
                   "clients16_latency_p95_s": round(many["latency_p95_s"], 3), "tokens": one["tokens"] + many["tokens"]}
        want = tokens * per_client * 17
        ok = figures["tokens"] == want
        self.report.add("serve, 16 streaming clients", "ok" if ok else "failed",
                        "" if ok else f"{figures['tokens']} tokens streamed, expected {want}", figures,
                        time.monotonic() - start)

    def quality(self) -> None:
        start = time.monotonic()
        s = self.shape
        side = (self.left_s() - s["quality_overhead_s"]) / 2.2  # the baseline's timing run: a tenth more
        if self.args.quality_side_s is not None:
            side = self.args.quality_side_s
        side = min(s["quality_max_side_s"], side)
        if side < s["quality_min_side_s"]:
            self.report.add("bench quality", "skipped", f"{self.left_s():.0f} s left of --total-budget: too little "
                            "for a quality run")
            return
        out = self.work / "quality"
        cmd = self.python("-m", "gpt2_dutch", "bench", "quality", "--data-files", str(self.args.corpus),
                          "--max-time", f"{side:.0f}s", "--output-dir", str(out), "--json-out",
                          str(out / "quality.json"), "--markdown-out", str(out / "quality.md"), "--plot-out",
                          str(out / "quality.png"), *(["--quick"] if self.tiny else []))
        r = self.spawn("quality", cmd, 3 * side + 300)
        if r.returncode != 0:
            raise RuntimeError(f"bench quality exited with {r.returncode}: {first_line(r.stdout)}")
        q = json.loads((out / "quality.json").read_text())["quality"]
        run = q["runs"][0]
        figures = {"budget_s_per_side": q["budget_s"], "corpus": str(self.args.corpus),
                   "ours_bits_per_byte": round(q["ours_bits_per_byte"], 4),
                   "baseline_bits_per_byte": round(q["baseline_bits_per_byte"], 4), "ratio": round(q["ratio"], 4),
                   "ours_model": q["ours"]["settings"].get("model_size"), "ours_steps": run["ours"]["steps"],
                   "baseline_steps": run["baseline"]["steps"], "ours_train_s": round(run["ours"]["train_seconds"], 1),
                   "baseline_train_s": round(run["baseline"]["train_seconds"], 1)}
        self.report.add("bench quality", "ok", "", figures, time.monotonic() - start)

    # -------------------------------------------------------------------------------------------------- order
    def run_all(self) -> None:
        checked(self.report, "environment")(self.environment)()
        checked(self.report, "data: preprocess")(self.data)()
        gen = checked(self.report, "generate --benchmark")
        srv = checked(self.report, "serve, 16 streaming clients")
        qual = checked(self.report, "bench quality")
        train = checked(self.report, "train")
        dist = checked(self.report, "torchrun")
        if self.dry:  # nothing is timed for real on CPU: the independent checks at once
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                jobs = [pool.submit(train(self.train_rows)), pool.submit(dist(self.distributed)),
                        pool.submit(qual(self.quality))]
                jobs[0].result()
                later = [pool.submit(gen(self.generate)), pool.submit(srv(self.serve))]
                for j in [*jobs, *later]:
                    j.result()
        else:  # one at a time: each speed is the GPU's alone; quality last, with the time that is left
            train(self.train_rows)()
            gen(self.generate)()
            srv(self.serve)()
            dist(self.distributed)()
            qual(self.quality)()


def nvidia_smi_driver() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def one_run(out: Path) -> Path:
    runs = [p for p in out.glob("gpt2-dutch-*") if p.is_dir() and not p.is_symlink()]
    if len(runs) != 1:
        raise RuntimeError(f"expected one run directory in {out}, found {len(runs)}")
    return runs[0]


def last_step(out: Path, step: int) -> int | None:
    """The step of a train record at or past `step` in the run under `out`, or None (yet)."""
    for metrics in out.glob("gpt2-dutch-*/metrics.jsonl"):
        with contextlib.suppress(OSError):
            for line in metrics.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    s = json.loads(line).get("step", 0)
                    if s >= step:
                        return s
    return None


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa = load_file(str(a / "final_model" / "model.safetensors"))
    wb = load_file(str(b / "final_model" / "model.safetensors"))
    if wa.keys() != wb.keys():
        raise RuntimeError(f"the two final models hold different tensors ({len(wa)} and {len(wb)})")
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


# ---------------------------------------------------------------------------------------------------- children

def child_train(spec_file: str, out_file: str) -> int:
    """Run each spec's `train` (its command-line flags, parsed as `gpt2-dutch train` parses them) in this process,
    one JSON line per row: its run directory, the loss kernel it used, its peak GPU memory."""
    import torch

    from gpt2_dutch.__main__ import command_config, command_parser
    from gpt2_dutch.train import train
    from gpt2_dutch.train.loss import fused_cuda_loss

    cuda = torch.cuda.is_available()
    with open(out_file, "a") as out:
        for spec in json.loads(Path(spec_file).read_text()):
            out.write(json.dumps({"start": spec["name"]}) + "\n")
            out.flush()
            start = time.monotonic()
            row: dict[str, Any] = {"name": spec["name"]}
            try:
                fused_error = None if spec["name"] != "fused" else "liger-kernel was not carried (make gpu-wheels)"
                if spec["fused_site"]:
                    fused_error = None  # the carried fused kernel becomes importable for this row only
                    sys.path.insert(0, spec["fused_site"])
                    fused_cuda_loss.cache_clear()
                    try:
                        import liger_kernel.transformers  # noqa: F401
                    except Exception as e:  # noqa: BLE001 - reported in the row
                        fused_error = f"liger_kernel: {type(e).__name__}: {first_line(str(e), 160)}"
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                cfg = command_config("train", command_parser("train").parse_args(spec["argv"]))
                with contextlib.redirect_stdout(sys.stderr):
                    run = train(cfg)
                used = fused_cuda_loss() if cuda and cfg.loss_chunk_tokens > 0 else None
                kernel = "model's own" if cfg.loss_chunk_tokens == 0 else (used[0] if used else "chunked")
                row.update(run=str(run), fused_import_error=fused_error, loss_kernel=kernel,
                           peak_gpu_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
            except BaseException as e:  # noqa: BLE001 - a row's failure, also SystemExit from a stage
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {first_line(str(e)) if str(e) else ''}"
            row["seconds"] = round(time.monotonic() - start, 2)
            out.write(json.dumps(row) + "\n")
            out.flush()
    return 0


def child_command(report_file: str, argv: list[str]) -> int:
    """`gpt2-dutch ARGV` as the command line runs it (here under torchrun), then what the process group was."""
    from gpt2_dutch.__main__ import main

    rc = main(argv)
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    if int(os.environ.get("RANK", "0")) == 0:
        Path(report_file).write_text(json.dumps({"rc": rc, "backend": backend}))
    return rc


# ------------------------------------------------------------------------------------------------------ report

def write_report(check: Check, started: str, seconds: float, install: dict[str, Any] | None) -> dict[str, Any]:
    rows = sorted(check.report.rows, key=lambda r: ROW_ORDER.index(r["check"]) if r["check"] in ROW_ORDER
                  else len(ROW_ORDER))
    if install is not None:
        rows.insert(0, install)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    env = next((r["figures"] for r in rows if r["check"] == "environment"), {})
    result = {"report": "gpt2-dutch GPU check", "issue": 27, "started": started, "dry_run": check.dry,
              "device": env.get("gpu") or env.get("cpu"), "seconds": round(seconds, 1),
              "total_budget_s": check.args.total_budget_s, "counts": counts, "rows": rows,
              "logs": str(check.logs)}
    out = Path(check.args.out_dir)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# GPU check ({'dry run on CPU' if check.dry else 'GPU'}), {started}", "",
             f"Device: {result['device']}; {seconds:.0f} s; {counts['ok']} ok, {counts['failed']} failed, "
             f"{counts['skipped']} skipped.", "", "| check | status | figures | reason |", "|---|---|---|---|"]
    for r in rows:
        figs = ", ".join(f"{k} {v}" for k, v in r["figures"].items() if v is not None)
        lines.append(f"| {r['check']} | {r['status']} | {figs.replace('|', '/')} | {r['reason'].replace('|', '/')} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return result


def claim_out_dir(out: Path) -> bool:
    """True when `out` is new, empty or an earlier check's (its MARKER file): only then does the check remove
    what it wrote there before (the .sh checks the same before it installs the wheels)."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        return False
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    return True


def parse_seconds(text: str) -> float:
    from gpt2_dutch.core.options import parse_duration

    return parse_duration(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-train"]:
        return child_train(argv[1], argv[2])
    if argv[:1] == ["--child-command"]:
        return child_command(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    if argv[:1] == ["--pins"]:  # NAME==VERSION as installed here, NAME where it is not (make gpu-wheels)
        import importlib.metadata as md

        for name in argv[1:]:
            try:
                print(f"{name}=={md.version(name)}")
            except md.PackageNotFoundError:
                print(name)
        return 0
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, seconds (the default without CUDA)")
    p.add_argument("--tiny", action="store_true", help="on a GPU: the dry run's tiny shapes and budgets, every "
                   "GPU expectation kept (about a minute: a smoke test before the full check)")
    p.add_argument("--corpus", help="the .jsonl(.gz) text with a 'text' field (default: wheels/corpus.jsonl.gz, "
                   "else ../shared/data/dutch/train.jsonl.gz beside the checkout, else the built-in sample)")
    p.add_argument("--out-dir", default="gpu_check", help="where gpu_check.json, gpu_check.md and logs/ go")
    p.add_argument("--total-budget", default=None, help="wall time for all checks (default 430s on a GPU, "
                   "the wheels' install before it; 10m on CPU); quality gets what the others leave")
    p.add_argument("--quality-side", default=None, help="bench quality's training time per side (default: from "
                   "the time left, at most 2m)")
    p.add_argument("--fused-site", default=os.environ.get("GPU_CHECK_FUSED_SITE"),
                   help="a folder holding liger_kernel, importable only for the fused row (the .sh sets it)")
    p.add_argument("--install-report", default=os.environ.get("GPU_CHECK_INSTALL_REPORT"),
                   help="a JSON row written by the .sh about installing the wheels")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    start, started = time.monotonic(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_check: no CUDA GPU here: a dry run on CPU with tiny shapes", file=sys.stderr)
        args.dry_run = True
    if args.dry_run:
        torch.set_num_threads(1)
    args.total_budget_s = parse_seconds(args.total_budget or ("10m" if args.dry_run or args.tiny else "430s"))
    args.quality_side_s = parse_seconds(args.quality_side) if args.quality_side else None
    if args.corpus is None:
        found = [c for c in DEFAULT_CORPORA if c.is_file()]
        from gpt2_dutch.data.sample import builtin_sample_path

        args.corpus = str(builtin_sample_path() if args.dry_run or args.tiny or not found else found[0])
    args.corpus = str(Path(args.corpus).resolve())  # the checks run in their own folder
    if not claim_out_dir(Path(args.out_dir)):
        print(f"gpu_check: error: --out-dir {args.out_dir} holds files that gpu_check did not write; give a new or "
              "empty folder (or the one an earlier check wrote)", file=sys.stderr)
        return 2
    install = None
    if args.install_report and Path(args.install_report).is_file():
        install = json.loads(Path(args.install_report).read_text())
    check = Check(args)
    check.run_all()
    result = write_report(check, started, time.monotonic() - start, install)
    c = result["counts"]
    print(f"gpu_check: {c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped in {result['seconds']:.0f} s: "
          f"{Path(args.out_dir) / 'gpu_check.md'}", file=sys.stderr)
    return 1 if c["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
