"""A run's records, in one place: run_config.json, metrics.jsonl, the run's status, and finding a run or a model.

A run lives in `<output-dir>/gpt2-dutch-<size>-<YYYYmmdd-HHMMSS>[-N]/`:

    run_config.json   the resolved settings (`"format": RECORD_FORMAT`) and the run's `status`: `running` from
                      the start, `stopped` after a signal (a checkpoint was saved), `diverged` or `failed` when it
                      ended without a usable model, `finished` once `final_model/` is published
    metrics.jsonl     one JSON object per log/eval record; `metrics_of_kind` sorts them into train, eval, summary
    checkpoints/      checkpoint-<step>/ (complete ones only; the staging directory is never one)
    final_model/      the published model

`<output-dir>/gpt2-dutch-<size>-latest` points at the newest *finished* run (what generate and evaluate want); a
bare `--resume` looks for the newest run that is not finished, so a run killed before its end is found too.
A model is named by its final_model, its run directory or a -latest link: `model_dir_of` and `locate` turn any
of the three into the model directory (and the run that made it). Records written before a field existed are
read as what they meant then (`run_status`). Every record is read through gpt2_dutch.core.reading (regular files
only, bounded) and its fields checked against RUN_CONFIG_SCHEMA and METRICS_SCHEMA: a wrong one is one line naming
the file, the line and the field.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.core.files import replace_symlink, write_bytes_atomic, write_json_atomic
from gpt2_dutch.core.reading import METRICS_BYTES, Opt, check_types, iter_jsonl, read_json, read_json_or_none

RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
FINAL_MODEL = "final_model"
FINISHED = "finished"
RECORD_FORMAT = "gpt2-dutch/run"  # run_config.json's "format" (TrainConfig.RECORD_FORMAT says the same)


# ------------------------------------------------------------------------------------------ run directories

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


# -------------------------------------------------------------------------------------------- run_config.json

# The fields that readers of a run's record rely on (the card, resume, bench, run_status); the rest are settings
# that TrainConfig checks when a record is replayed.
RUN_CONFIG_SCHEMA = {
    "format": Opt(str), "status": Opt(str), "started_at": Opt(str), "model_size": Opt(str),
    "dataset_path": Opt(str), "precision": Opt(str), "license": Opt(str), "push_to_hub": Opt(str),
    "total_steps": Opt(int), "tokens_per_step": Opt(int), "world_size": Opt(int), "context": Opt(int),
    "vocab_size": Opt(int), "parameters": Opt(int), "flops_per_token": Opt(float), "learning_rate": Opt(float),
    "extensions": Opt(list), "chosen_for_budget": Opt(dict),
}
# metrics.jsonl: every field a reader does arithmetic on or compares
METRICS_SCHEMA = {key: Opt(float) for key in ("loss", "eval_loss", "eval_bpb", "eval_ppl", "tokens", "train_runtime",
                                                "eval_runtime", "tokens_per_s", "lr", "grad_norm")}
METRICS_SCHEMA["step"] = Opt(int)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's record ({} when there is none); a damaged one, or one whose fields have the wrong type, is a
    one-line error naming the file, the line and the field."""
    path = run_dir / RUN_CONFIG
    if not os.path.lexists(path):
        return {}
    try:
        return read_json(path, schema=RUN_CONFIG_SCHEMA)
    except UsageError as e:
        problem = str(e).removeprefix(str(path)).lstrip(": ")
        raise UsageError(f"{path} cannot be read ({problem}); the run directory is damaged") from None


def read_run_config_or_none(run_dir: Path | None) -> dict[str, Any] | None:
    """The run's record, or None when it is missing or damaged: for readers that state less rather than fail
    (the model card, the playground)."""
    if run_dir is None:
        return None
    data = read_json_or_none(run_dir / RUN_CONFIG, schema=RUN_CONFIG_SCHEMA)
    return data if isinstance(data, dict) else None


def write_run_config(run_dir: Path, record: dict[str, Any]) -> None:
    write_json_atomic(run_dir / RUN_CONFIG, record)


def update_run_config(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Merge `changes` into run_config.json (atomically) and return the result."""
    saved = read_run_config(run_dir)
    saved.update(changes)
    write_run_config(run_dir, saved)
    return saved


def run_status(run_dir: Path) -> str:
    """`finished`, `running`, `stopped`, ...; runs written before statuses existed are finished iff they have
    a final_model."""
    saved = read_run_config(run_dir)
    if "status" in saved:
        return str(saved["status"])
    return FINISHED if (run_dir / FINAL_MODEL / "config.json").is_file() else "running"


# ---------------------------------------------------------------------------------------------- metrics.jsonl

def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records in the order they were written ([] without the file); a line cut short by a kill
    or a full disk is skipped, a record whose fields have the wrong type is a one-line error."""
    return read_metrics_file(run_dir / METRICS)


def read_metrics_file(path: Path) -> list[dict[str, Any]]:
    """As `read_metrics`, for a metrics.jsonl wherever it lies."""
    return [value for _, _, value in _metrics_lines(path) if isinstance(value, dict)]


def _metrics_lines(path: Path) -> Iterator[tuple[int, bytes, Any]]:
    """(line number, bytes, value) of each line of a metrics.jsonl; the value of a line that does not parse is a
    BadFile, and one that is not a mapping (never written by us) is left for the caller to skip."""
    for number, raw, value in iter_jsonl(path):
        if isinstance(value, dict):
            check_types(value, METRICS_SCHEMA, f"{path} line {number}")
        yield number, raw, value


def metric_kind(record: dict[str, Any]) -> str:
    """`eval` (an evaluation), `train` (a logged training loss), `summary` (the training loop's end: its
    runtime), or `other`."""
    if record.get("eval_loss") is not None:
        return "eval"
    if record.get("loss") is not None:
        return "train"
    if record.get("train_runtime") is not None:
        return "summary"
    return "other"


def metrics_of_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records of one `metric_kind`, in order."""
    return [r for r in records if metric_kind(r) == kind]


def keep_metrics_up_to(run_dir: Path, step: int) -> None:
    """On resume, drop the rows logged after the checkpoint's `step` (those steps are trained again and would
    repeat) and any line cut short; the kept lines stay byte for byte."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    kept = [raw if raw.endswith(b"\n") else raw + b"\n" for _, raw, value in _metrics_lines(path)
            if isinstance(value, dict) and value.get("step", 0) <= step]
    write_bytes_atomic(path, b"".join(kept))


# -------------------------------------------------------------------------------------------------- checkpoints

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
    torch.save file a complete zip archive (a truncated one has no central directory), parseable JSON.

    The file names are the Trainer's checkpoint layout and the zip check leans on torch.save's archive format, neither
    of which has a public "is this complete" call; test_trainer.py's test_a_kill_mid_save_leaves_only_complete_
    checkpoints_and_the_run_resumes passes a real checkpoint through this and fails if either changes."""
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
        if not (checkpoint / name).is_file():
            return f"no {name}"
        try:
            read_json(checkpoint / name, what=name, max_bytes=METRICS_BYTES)  # the Trainer's log history grows
        except UsageError as e:
            return f"{name} is damaged ({str(e).removeprefix(name).lstrip(': ')})"
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


# ------------------------------------------------------------------------------------------- finding a model

def model_dir_of(path: str | Path) -> Path:
    """The model directory that `path` names: a run directory or a -latest link stands for its final_model; any
    other path is itself (not resolved, not checked)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file() and (p / FINAL_MODEL).is_dir():
        return p / FINAL_MODEL
    return p


def locate(path: str | Path) -> tuple[Path, Path | None]:
    """(model directory, the run directory that made it or None), links resolved, for a final_model, a run
    directory or a -latest link."""
    model = model_dir_of(Path(path).expanduser().resolve())
    return model, (model.parent if (model.parent / RUN_CONFIG).is_file() else None)
