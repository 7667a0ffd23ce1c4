"""gpt2_dutch.runs.records, the one owner of a run's records: run_config.json, metrics.jsonl, the status, finding a
run or a model (final_model, run directory, -latest link), checkpoints. Fast: no training."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.runs.records import (
    FINISHED,
    RECORD_FORMAT,
    checkpoints_of,
    create_run_dir,
    keep_metrics_up_to,
    latest_link,
    locate,
    metric_kind,
    metrics_of_kind,
    model_dir_of,
    newest_unfinished_run,
    read_metrics,
    read_run_config,
    run_status,
    update_latest_link,
    update_run_config,
)
from gpt2_dutch.train.config import TrainConfig

ROWS = [{"step": 1, "loss": 4.0, "tokens": 128}, {"step": 2, "eval_loss": 3.9, "eval_bpb": 1.2, "tokens": 256},
        {"step": 2, "train_runtime": 1.5}, {"step": 3, "loss": 3.8, "tokens": 384}]


def a_run(root: Path, *, status: str | None = FINISHED, started: str = "2026-01-01T00:00:00",
          now: datetime | None = None) -> Path:
    run = create_run_dir(root, "tiny", now or datetime(2026, 1, 1))
    record = {"format": RECORD_FORMAT, "model_size": "tiny", "started_at": started}
    if status is not None:
        record["status"] = status
    (run / "run_config.json").write_text(json.dumps(record))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    if status == FINISHED:
        (run / "final_model").mkdir()
        (run / "final_model" / "config.json").write_text("{}")
    return run


def test_the_record_format_is_the_train_configs():
    assert RECORD_FORMAT == TrainConfig.RECORD_FORMAT


def test_metrics_are_read_in_order_and_a_cut_line_is_skipped(tmp_path):
    run = a_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"step": 4, "lo')  # not a record; a line cut short by a kill
    assert read_metrics(run) == ROWS
    assert read_metrics(tmp_path / "nowhere") == []


def test_rows_by_kind():
    assert [metric_kind(r) for r in ROWS] == ["train", "eval", "summary", "train"]
    assert metric_kind({"step": 5}) == "other"
    assert [r["step"] for r in metrics_of_kind(ROWS, "train")] == [1, 3]
    assert metrics_of_kind(ROWS, "eval") == [ROWS[1]]


def test_a_resume_keeps_the_rows_up_to_its_checkpoint_byte_for_byte(tmp_path):
    run = a_run(tmp_path)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"step": 9, "lo')
    keep_metrics_up_to(run, 2)
    assert (run / "metrics.jsonl").read_text() == "".join(text.splitlines(keepends=True)[:3])
    keep_metrics_up_to(tmp_path / "no-run", 2)  # nothing to keep: nothing written
    assert not (tmp_path / "no-run").exists()


def test_run_config_updates_merge_and_a_damaged_one_is_one_line(tmp_path):
    run = a_run(tmp_path, status="running")
    assert update_run_config(run, status="stopped", total_steps=4)["model_size"] == "tiny"
    assert read_run_config(run)["status"] == "stopped" and read_run_config(run)["total_steps"] == 4
    assert read_run_config(tmp_path / "none") == {}
    (run / "run_config.json").write_text("{not json")
    with pytest.raises(UsageError, match="run_config.json cannot be read"):
        read_run_config(run)


@pytest.mark.parametrize("status,final_model,expected", [
    ("stopped", True, "stopped"), ("running", False, "running"),
    (None, True, FINISHED), (None, False, "running"),  # records from before statuses existed
])
def test_status(tmp_path, status, final_model, expected):
    run = a_run(tmp_path, status=FINISHED if final_model else "running")
    record = read_run_config(run)
    record.pop("status")
    if status is not None:
        record["status"] = status
    (run / "run_config.json").write_text(json.dumps(record))
    assert run_status(run) == expected


def test_two_runs_of_one_second_get_their_own_directories(tmp_path):
    now = datetime(2026, 1, 1, 12, 0, 0)
    first, second = create_run_dir(tmp_path, "tiny", now), create_run_dir(tmp_path, "tiny", now)
    assert first.name == "gpt2-dutch-tiny-20260101-120000" and second.name == first.name + "-2"
    assert (first / "checkpoints").is_dir() and checkpoints_of(first) == []


def test_the_newest_unfinished_run_is_what_resume_continues(tmp_path):
    old = a_run(tmp_path, status="stopped", started="2026-01-01T00:00:00")
    a_run(tmp_path, status=FINISHED, started="2026-01-03T00:00:00")
    new = a_run(tmp_path, status="running", started="2026-01-02T00:00:00")
    assert newest_unfinished_run(tmp_path, "tiny") is None  # no checkpoint: nothing to continue
    for run in (old, new):
        (run / "checkpoints" / "checkpoint-2").mkdir()
    (old / "checkpoints" / "checkpoint-10").mkdir()
    (old / "checkpoints" / "checkpoint-tmp").mkdir()  # staging: never a checkpoint
    assert newest_unfinished_run(tmp_path, "tiny") == new
    assert [p.name for p in checkpoints_of(old)] == ["checkpoint-2", "checkpoint-10"]


def test_a_model_is_found_from_its_final_model_run_directory_or_latest_link(tmp_path):
    run = a_run(tmp_path)
    update_latest_link(run, "tiny")
    link = latest_link(tmp_path, "tiny")
    final = run.resolve() / "final_model"
    for name in (run, run / "final_model", link, link / "final_model"):
        assert locate(name) == (final, run.resolve())
    assert model_dir_of(link) == link / "final_model"  # not resolved: messages name what the user passed
    unfinished = a_run(tmp_path, status="running")
    assert locate(unfinished) == (unfinished.resolve(), None)
    elsewhere = tmp_path / "exported"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    assert locate(elsewhere) == (elsewhere.resolve(), None) and model_dir_of(elsewhere) == elsewhere
