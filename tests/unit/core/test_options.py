"""core/options.py: --config files under the flags and over the defaults, old keys, bad files as one line, and
replaying a run from its run_config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from gpt2_dutch.__main__ import command_config, command_parser
from gpt2_dutch.core.options import load_config
from gpt2_dutch.train import TrainConfig


def _config(command: str, *argv: str | Path):
    args = command_parser(command).parse_args([str(a) for a in argv])
    return command_config(command, args)


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("dataset_path: data/x\nbatch_size: 4\nseed: 7\nlearning_rate: 6e-4  # YAML reads this as text\n")
    cfg = _config("train", "--config", path, "--seed", "9")
    assert (cfg.dataset_path, cfg.batch_size, cfg.seed, cfg.learning_rate) == ("data/x", 4, 9, 6e-4)
    assert cfg.model_size == TrainConfig.__dataclass_fields__["model_size"].default
    # a flag given with the default's value still wins over the file
    assert _config("train", "--config", path, "--batch-size", "8").batch_size == 8


def test_json_and_the_other_commands(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"data_files": ["a.jsonl", "b.jsonl"], "chunk_size": 256, "threads": 2}))
    cfg = _config("preprocess", "--config", path)
    assert (cfg.data_files, cfg.chunk_size, cfg.threads, cfg.dataset_size) == (["a.jsonl", "b.jsonl"], 256, 2, None)
    # repeatable flags replace the file's list
    assert _config("preprocess", "--config", path, "--data-files", "c.txt").data_files == ["c.txt"]
    path.write_text(json.dumps({"prompt": ["Er was eens"], "greedy": True, "precision": "fp32"}))
    cfg = _config("generate", "--config", path)
    assert (cfg.prompt, cfg.greedy, cfg.precision) == (["Er was eens"], True, "fp32")


def test_an_old_key_in_a_file_is_read_with_a_notice(tmp_path, capsys):
    path = tmp_path / "e.yaml"
    path.write_text("dataset_path: d\nmax_chunks: 5\ndtype: bf16\n")
    cfg = _config("evaluate", "--config", path)
    assert (cfg.eval_chunks, cfg.precision) == (5, "bf16")
    err = capsys.readouterr().err
    assert "key 'max_chunks' is deprecated, use 'eval_chunks'" in err and "key 'dtype' is deprecated" in err


BAD_FILES = [
    # (file name, content (None: no file), command, the one line)
    ("missing.yaml", None, "train", "--config missing.yaml not found"),
    ("dir", "<dir>", "train", "--config dir is a directory"),
    ("bad.json", '{"batch_size": 4,}', "train", "--config bad.json is not valid JSON (line 1, column 18"),
    ("bad.yaml", "batch_size: [4\n", "train", "--config bad.yaml is not valid YAML (line 2"),
    ("latin1.yaml", b"name: caf\xe9\n", "preprocess", "--config latin1.yaml is not UTF-8 text (byte 0xe9"),
    ("list.json", "[1, 2]", "train", "must hold a mapping of settings (key: value), not a list"),
    ("text.yaml", "just words", "train", "must hold a mapping of settings (key: value), not a string"),
    ("unknown.yaml", "dataset_path: d\nlearnng_rate: 1\n", "train",
     "unknown setting 'learnng_rate' (did you mean learning_rate?)"),
    ("dashes.yaml", "dataset-path: d\n", "train", "unknown setting 'dataset-path' (did you mean dataset_path?)"),
    ("status.json", '{"dataset_path": "d", "status": "finished"}', "train", "unknown setting 'status'"),
    ("int.yaml", "dataset_path: d\nbatch_size: eight\n", "train", "batch_size must be a whole number (got the "
     "string 'eight')"),
    ("float-int.json", '{"dataset_path": "d", "batch_size": 8.5}', "train", "batch_size must be a whole number"),
    ("bool.yaml", "dataset_path: d\ncompile: 'yes'\n", "train", "compile must be true or false (got the string"),
    ("null.yaml", "dataset_path: d\nseed: null\n", "train", "seed must not be null"),
    ("choice.yaml", "dataset_path: d\nprecision: fp8\n", "train", "precision must be one of auto, bf16, fp16, fp32"),
    ("list.yaml", "data_files: corpus.jsonl\n", "preprocess", "data_files must be a list (got the string"),
    ("str.yaml", "dataset_path: d\nmax_time: [90]\n", "train", "max_time must be a string (got the list"),
    ("checked.yaml", "dataset_path: d\nbatch_size: 0\n", "train", "--batch-size must be positive (got 0)"),
    ("other.json", '{"format": "gpt2-dutch/chunks"}', "train", "is a 'gpt2-dutch/chunks' file, not settings of "
     "this command"),
    ("record.json", '{"format": "gpt2-dutch/run", "model_size": "tiny"}', "preprocess", "is a 'gpt2-dutch/run' "
     "file"),
]


@pytest.mark.parametrize(("name", "content", "command", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_config_file_is_one_line(cli, tmp_path, monkeypatch, name, content, command, message):
    monkeypatch.chdir(tmp_path)
    if content == "<dir>":
        Path(name).mkdir()
    elif isinstance(content, bytes):
        Path(name).write_bytes(content)
    elif content is not None:
        Path(name).write_text(content)
    rc, _, err = cli(command, "--config", name)
    assert_one_line_error(rc, err, message)


def test_an_empty_file_holds_no_settings(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert _config("preprocess", "--config", tmp_path / "empty.yaml").dataset_size == "10k"


def test_max_time_s_is_a_derived_field_that_a_file_cannot_set(tmp_path):
    cfg = TrainConfig(dataset_path="d", max_time="2m")
    assert dataclasses.asdict(cfg)["max_time_s"] == 120
    path = tmp_path / "t.json"
    path.write_text(json.dumps({**dataclasses.asdict(cfg), "max_time_s": 5}))  # what a saved config holds
    assert load_config(TrainConfig, path).max_time_s == 120


def test_a_record_replays_its_settings_but_never_its_resume(tmp_path, capsys):
    settings = dataclasses.asdict(TrainConfig(dataset_path="d", model_size="tiny", resume="auto", max_steps=7))
    record = {"format": TrainConfig.RECORD_FORMAT, **settings, "status": "finished", "total_steps": 7,
              "parameters": 123, "extensions": [{"from_step": 4, "to_step": 7}]}
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(record))
    cfg = _config("train", "--config", path)
    assert cfg == dataclasses.replace(TrainConfig(**{k: v for k, v in settings.items() if k != "max_time_s"}),
                                      resume=None)
    assert "resume 'auto' is not replayed: this starts a new run" in capsys.readouterr().err
    # the same key in a hand-written file is a setting like any other (a requeued job's `resume: auto`)
    (tmp_path / "job.yaml").write_text("dataset_path: d\nresume: auto\n")
    assert _config("train", "--config", tmp_path / "job.yaml").resume == "auto"
    # and --resume on the command line always counts
    assert _config("train", "--config", path, "--resume").resume == "latest"


# (old key, value, new key): a run recorded before a rename holds the setting under its old name
OLD_KEYS = [("hub_private", True, "private"), ("num_workers", 2, "dataloader_workers")]


@pytest.mark.parametrize(("old", "value", "new"), OLD_KEYS, ids=[o for o, _, _ in OLD_KEYS])
def test_a_record_from_before_a_rename_still_replays(tmp_path, capsys, old, value, new):
    settings = dataclasses.asdict(TrainConfig(dataset_path="d", model_size="tiny"))
    del settings[new]
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps({"format": TrainConfig.RECORD_FORMAT, **settings, old: value, "status": "finished"}))
    assert getattr(_config("train", "--config", path), new) == value
    assert f"key {old!r} is deprecated, use {new!r}" in capsys.readouterr().err
