"""scripts/gpu_check.sh (issue #27) as a dry run on CPU: every check of the GPU check runs with tiny shapes and
lands in the report as a row with its figures; a failing check is a row too, and the others still run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
ROWS = ["install the carried wheels", "environment", "data: preprocess", "train eager", "train own_loss",
        "train adamw", "train compile", "train fused", "loss: model's own vs chunked", "loss: fused vs chunked",
        "optimizer: adamw vs muon", "--compile vs eager", "generate --benchmark", "serve, 16 streaming clients",
        "torchrun: NCCL, stop and exact resume", "torchrun --fsdp, one rank", "bench quality"]
SKIPPED = {"train compile", "train fused", "loss: fused vs chunked", "--compile vs eager"}  # CUDA-only or ~30 s


def probe_wheel(folder: Path) -> Path:
    """A pure-Python wheel of one module, as `make gpu-wheels` leaves real ones in wheels/cpXY/."""
    folder.mkdir(parents=True)
    wheel = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    info = "gpu_check_probe-0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gpu_check_probe.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"gpu_check_probe.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return wheel


def gpu_check(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    probe_wheel(tmp / "wheels" / TAG)
    out = tmp / "report"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_WHEELS": str(tmp / "wheels")}
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out-dir", str(out), *args], capture_output=True,
                       text=True, env=env, timeout=300)
    report = json.loads((out / "gpu_check.json").read_text())
    return r, report, {row["check"]: row for row in report["rows"]}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    return (*gpu_check(tmp), tmp / "report")


@pytest.mark.slow
def test_every_check_is_a_row_and_none_fails(dry_run):
    r, report, rows, out = dry_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["check"] for row in report["rows"]] == ROWS
    assert {c for c, row in rows.items() if row["status"] == "skipped"} == SKIPPED
    assert report["counts"] == {"ok": len(ROWS) - len(SKIPPED), "failed": 0, "skipped": len(SKIPPED)}
    assert report["dry_run"] is True and report["device"]
    assert all(row["reason"] for row in rows.values() if row["status"] == "skipped")
    # the markdown: one table row per check, its status beside it
    md = (out / "gpu_check.md").read_text().splitlines()
    for check, row in rows.items():
        assert sum(line.startswith(f"| {check} | {row['status']} |") for line in md) == 1, check


@pytest.mark.slow
def test_the_wheels_are_installed_first(dry_run):
    _r, _report, rows, out = dry_run
    install = rows["install the carried wheels"]
    assert install["status"] == "ok" and install["figures"]["wheels"] == 1
    assert install["figures"]["fused_kernel_wheels"] == 0
    assert (out / "site" / "gpu_check_probe.py").read_text() == "VALUE = 42\n"


@pytest.mark.slow
def test_environment_and_data_figures(dry_run):
    _r, _report, rows, _out = dry_run
    env = rows["environment"]["figures"]
    assert env["torch"] == torch.__version__ and env["gpu"] is None
    assert env["matmul_fp32_tflops"] > 0 and env["matmul_bf16_tflops"] > 0 and env["read_gb_per_s"] > 0
    data = rows["data: preprocess"]["figures"]
    assert (data["context"], data["vocab"]) == (64, 400) and data["train_chunks"] > 10 and data["text_mb"] > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("row, optimizer, loss", [("train eager", "muon", "chunked"),
                                                  ("train own_loss", "muon", "model's own"),
                                                  ("train adamw", "adamw", "chunked")])
def test_train_rows(dry_run, row, optimizer, loss):
    f = dry_run[2][row]["figures"]
    assert (f["model_size"], f["context"], f["batch"], f["precision"]) == ("pico", 64, 2, "fp32")
    assert (f["optimizer"], f["loss"], f["compile"]) == (optimizer, loss, False)
    assert f["steps"] >= 1 and f["tokens_per_s"] > 0 and 0 < f["mfu"] < 1
    assert f["step_ms"] == pytest.approx(1000 * 2 * 64 / f["tokens_per_s"], rel=0.01)
    assert abs(f["first_loss"] - math.log(400)) < 1  # untrained: about uniform over the vocabulary
    assert f["peak_gpu_memory_gb"] is None  # no GPU


@pytest.mark.slow
def test_comparisons_agree_on_the_first_step(dry_run):
    """Step 1's loss is the same weights on the same batch: another loss kernel rounds differently (fp32 here),
    another optimizer has not stepped yet."""
    rows = dry_run[2]
    for check, a, b, most in [("loss: model's own vs chunked", "train own_loss", "train eager", 1e-5),
                              ("optimizer: adamw vs muon", "train adamw", "train eager", 0.0)]:
        f = rows[check]["figures"]
        assert f["first_loss"] == [rows[a]["figures"]["first_loss"], rows[b]["figures"]["first_loss"]]
        assert f["first_loss_rel_diff"] <= most
        assert f["speed_ratio"] == pytest.approx(rows[a]["figures"]["tokens_per_s"] /
                                                 rows[b]["figures"]["tokens_per_s"], rel=0.01)


@pytest.mark.slow
def test_decoding_rows(dry_run):
    rows = dry_run[2]
    g = rows["generate --benchmark"]["figures"]
    assert g["device"] == "cpu" and g["new_tokens"] == 8 and g["batch1_tokens_per_s"] > 0
    assert g["batch16_over_batch1"] == pytest.approx(g["batch16_tokens_per_s"] / g["batch1_tokens_per_s"], rel=0.01)
    s = rows["serve, 16 streaming clients"]["figures"]
    assert s["tokens"] == 4 * 1 * 17  # 1 client, then 16, each request streamed to its max_tokens
    assert s["clients1_tokens_per_s"] > 0 and s["clients16_tokens_per_s"] > 0
    assert s["clients16_latency_p95_s"] >= s["clients16_latency_p50_s"] > 0


@pytest.mark.slow
def test_distributed_rows(dry_run):
    rows = dry_run[2]
    r = rows["torchrun: NCCL, stop and exact resume"]["figures"]
    assert (r["backend"], r["world_size"], r["resumed_status"]) == ("gloo", 1, "finished")  # NCCL on a GPU
    assert r["sigterm_at_step"] >= 10 and r["checkpoints"]
    assert r["max_weight_diff_vs_uninterrupted"] == 0.0  # CPU: bit for bit
    f = rows["torchrun --fsdp, one rank"]["figures"]
    assert (f["status"], f["world_size"]) == ("finished", 1)
    assert f["saved_parameters"] == f["parameters"] > 0


@pytest.mark.slow
def test_quality_row(dry_run):
    q = dry_run[2]["bench quality"]["figures"]
    assert q["budget_s_per_side"] == 3.0
    assert q["ours_bits_per_byte"] > 0 and q["baseline_bits_per_byte"] > 0
    assert q["ratio"] == pytest.approx(q["ours_bits_per_byte"] / q["baseline_bits_per_byte"], rel=1e-3)
    assert q["ours_steps"] > 0 and q["baseline_steps"] > 0


@pytest.mark.slow
def test_a_failing_check_is_a_row_and_the_others_still_run(tmp_path):
    """A corpus that is not there: the data check fails in one line, every check that needs it fails saying
    why, the environment is still measured, and the report is written; the exit status says a check failed."""
    r, report, rows = gpu_check(tmp_path, "--corpus", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1
    assert [row["check"] for row in report["rows"]][:3] == ROWS[:3]
    assert rows["environment"]["status"] == "ok" and rows["environment"]["figures"]["matmul_fp32_tflops"] > 0
    assert rows["data: preprocess"]["status"] == "failed" and "missing.jsonl" in rows["data: preprocess"]["reason"]
    for check in ("train eager", "torchrun: NCCL, stop and exact resume", "torchrun --fsdp, one rank"):
        assert rows[check]["status"] == "failed" and "data check failed" in rows[check]["reason"], check
    assert rows["generate --benchmark"]["status"] == "failed"
    assert "every train row failed" in rows["generate --benchmark"]["reason"]
    assert rows["bench quality"]["status"] == "failed" and "\n" not in rows["bench quality"]["reason"]
    assert report["counts"]["failed"] >= 10 and report["counts"]["ok"] == 2  # the wheels and the environment


def test_an_out_dir_holding_other_files_is_refused_untouched(tmp_path):
    """--out-dir is replaced only when it is new, empty or an earlier check's: a user's folder stays as it was."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "mine.txt").write_text("keep me")
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out-dir", str(tmp_path)], capture_output=True,
                       text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"gpu_check: error: --out-dir {tmp_path} holds files that gpu_check did "
                                             "not write; give a new or empty folder"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine.txt", "site"]
    assert (tmp_path / "site" / "mine.txt").read_text() == "keep me"
