"""Run directories: unique names, status, finding what to resume, validating checkpoints, the -latest link.

A run lives in `<output-dir>/gpt2-dutch-<size>-<YYYYmmdd-HHMMSS>[-N]/`. Its `run_config.json` carries a
`status`: `running` from the start, `stopped` after a signal (a checkpoint was saved), `diverged` or `failed`
when it ended without a usable model, `finished` once `final_model/` is published. `-latest` points at the
newest *finished* run (what `generate` and `evaluate` want); a bare `--resume` looks for the newest run that is
not finished, so a run killed before its end is found too.
"""

from __future__ import annotations

import json
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files import replace_symlink, write_json_atomic

RUN_CONFIG = "run_config.json"
FINISHED = "finished"


def run_prefix(size: str) -> str:
    return f"gpt2-dutch-{size}-"


def latest_link(output_dir: Path, size: str) -> Path:
    return output_dir / f"{run_prefix(size)}latest"


def create_run_dir(output_dir: Path, size: str, now: datetime | None = None) -> Path:
    """Make a new, empty run directory whose name no other run has, even one started in the same second.

    `mkdir` without exist_ok is atomic: of two processes racing for a name, one gets it and the other takes
    the next suffix, so two runs never share a directory (and so never share metrics or run_config.json).
    """
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            run_dir = output_dir / (f"{run_prefix(size)}{stamp}" + (f"-{n}" if n > 1 else ""))
            try:
                run_dir.mkdir()
            except FileExistsError:
                continue
            (run_dir / "checkpoints").mkdir()
            return run_dir
    except OSError as e:
        raise UsageError(f"cannot write to --output-dir {output_dir} ({e.strerror})") from None
    raise UsageError(f"cannot find a free run name in {output_dir}")


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UsageError(f"{path} cannot be read ({e}); the run directory is damaged") from None


def update_run_config(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Merge `changes` into run_config.json (atomically) and return the result."""
    saved = read_run_config(run_dir)
    saved.update(changes)
    write_json_atomic(run_dir / RUN_CONFIG, saved)
    return saved


def run_status(run_dir: Path) -> str:
    """`finished`, `running`, `stopped`, ...; runs written before statuses existed are finished iff they have
    a final_model."""
    saved = read_run_config(run_dir)
    if "status" in saved:
        return str(saved["status"])
    return FINISHED if (run_dir / "final_model" / "config.json").is_file() else "running"


def checkpoints_of(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (the staging directory is never one)."""
    found = []
    for p in (run_dir / "checkpoints").glob("checkpoint-*"):
        suffix = p.name.removeprefix("checkpoint-")
        if suffix.isdigit() and p.is_dir():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None. Checks structure cheaply, without loading tensors:
    weights in safetensors (never a pickle), a readable safetensors header whose data fits the file, every
    torch.save file a complete zip archive (a truncated one has no central directory), parseable JSON."""
    from safetensors import safe_open

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        pickles = [p.name for p in checkpoint.glob("pytorch_model*.bin")]
        return ("its weights are a pickle (" + ", ".join(pickles) + "), which is never loaded; only safetensors"
                if pickles else "no model.safetensors")
    try:
        with safe_open(str(weights), "pt") as f:
            names = list(f.keys())
        if not names:
            return "model.safetensors holds no tensors"
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        return f"model.safetensors is damaged ({str(e).splitlines()[0][:120]})"
    for name in ("trainer_state.json", "config.json"):
        try:
            json.loads((checkpoint / name).read_text())
        except FileNotFoundError:
            return f"no {name}"
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"{name} is damaged ({e})"
    for name in ("optimizer.pt", "scheduler.pt"):
        path = checkpoint / name
        if not path.is_file():
            return f"no {name}"
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{name} is damaged ({e})"
    return None


def usable_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of `run_dir` that passes `checkpoint_problem`; a damaged newer one is skipped with a
    notice (a kill can truncate files the rename did not protect, and disks corrupt)."""
    import sys

    for checkpoint in reversed(checkpoints_of(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        print(f"notice: skipping {checkpoint}: {problem}; trying the previous checkpoint", file=sys.stderr)
    return None


def runs_of(output_dir: Path, size: str) -> list[Path]:
    """Run directories of `size` in `output_dir`, newest first (by start time, then name)."""
    prefix = run_prefix(size)
    runs = [p for p in output_dir.glob(f"{prefix}*") if p.is_dir() and not p.is_symlink()
            and p.name[len(prefix):][:1].isdigit() and (p / RUN_CONFIG).is_file()]

    def started(p: Path) -> tuple[str, float, str]:
        saved = read_run_config(p)
        return (str(saved.get("started_at", "")), (p / RUN_CONFIG).stat().st_mtime, p.name)

    return sorted(runs, key=started, reverse=True)


def newest_unfinished_run(output_dir: Path, size: str) -> Path | None:
    for run_dir in runs_of(output_dir, size):
        if run_status(run_dir) != FINISHED and checkpoints_of(run_dir):
            return run_dir
    return None


def update_latest_link(run_dir: Path, size: str) -> None:
    replace_symlink(latest_link(run_dir.parent, size), run_dir.name)  # always a complete run's name
