"""core/reading.py, the one bounded way to read JSON, YAML and JSON Lines: a FIFO or device is refused before a read,
size, depth, number length and YAML alias expansion are bounded, and every refusal is one line naming the file, the
line and the field, with an echoed value cut short. Then the readers wired to it: --config, manifest.json,
run_config.json and metrics.jsonl. Fast: no model, no training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.core.options import read_config_file
from gpt2_dutch.core.reading import (
    CONFIG_BYTES,
    MAX_DEPTH,
    SHOWN_CHARS,
    Opt,
    check_types,
    iter_jsonl,
    read_json,
    read_json_or_none,
    short,
)
from gpt2_dutch.data.chunks import read_manifest
from gpt2_dutch.runs.card import card_facts
from gpt2_dutch.runs.records import (
    keep_metrics_up_to,
    read_metrics,
    read_run_config,
    read_run_config_or_none,
)

# Each line of an error is at most this long however large the value it echoes (the path of tmp_path aside).
SHORT_LINE = 300
pytestmark = pytest.mark.usefixtures("no_hang")  # conftest's: a read that blocks fails the test, never hangs it


def _one_line(error: pytest.ExceptionInfo, root: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert len(message.replace(str(root), "")) < SHORT_LINE, message
    return message


def _bomb(levels: int = 9) -> str:
    """The billion laughs: 9 aliases of 9 aliases ... expand to 9**levels strings from a few hundred bytes."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# (file name, content: str, bytes, "<fifo>", "<dir>" or "<dev/zero>", the one line's text)
BAD_FILES = [
    ("fifo.json", "<fifo>", "fifo.json is a FIFO, not a regular file"),
    ("zero.json", "<dev/zero>", "/dev/zero is a device, not a regular file"),
    ("dir.json", "<dir>", "dir.json is a directory, not a regular file"),
    ("missing.json", None, "missing.json not found"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, f"deep.json line 1: lists or mappings nested deeper than {MAX_DEPTH}"),
    ("deep-line.json", '{\n"a": 1,\n"b": ' + "[" * 150 + "]" * 150 + "}",
     f"deep-line.json line 3: lists or mappings nested deeper than {MAX_DEPTH} levels"),
    ("just-deep.json", "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "just-deep.json line 1: lists or mappings"),
    ("number.json", '{"batch_size":\n' + "9" * 5000 + "}", "number.json line 2: a number of 5000 characters; at most"),
    ("float.json", '{"lr": 0.' + "1" * 5000 + "}", "float.json line 1: a number of 5002 characters"),
    ("big.json", " " * (CONFIG_BYTES + 1), "big.json is larger than 4 MiB"),
    ("latin1.json", b'{"name": "caf\xe9"}', "latin1.json is not UTF-8 text (byte 0xe9 at offset 13)"),
    ("syntax.json", '{"a": 1,}', "syntax.json is not valid JSON (line 1, column 9"),
    ("bomb.yaml", _bomb(), "bomb.yaml line 6: more than 100,000 values once its aliases are expanded"),
    ("surrogate.json", '{"ok": "\\ud83d\\ude00",\n"name": "caf\\udce9"}',
     "surrogate.json line 2: the string 'caf\\udce9' holds a lone surrogate escape, which is not text"),
    ("surrogate.yaml", 'name: "\\ud800"\n', "surrogate.yaml line 1: the string '\\ud800' holds a lone surrogate"),
    ("loop.yaml", "a: &a [1, *a]\n", "loop.yaml line 1: an alias refers to the node that holds it"),
    ("deep.yaml", "a: " + "[" * 100_000, "deep.yaml: lists or mappings nested deeper than 100 levels"),
    ("deep-line.yaml", "a: 1\nb: " + "[" * 150 + "]" * 150 + "\n", "deep-line.yaml line 2: lists or mappings"),
    ("number.yaml", "a: 1\nseed: " + "7" * 5000 + "\n", "number.yaml line 2: a number of 5000 characters"),
    ("date.yaml", "started: 2026-13-45\n", "date.yaml is not valid YAML (month must be in 1..12)"),
    ("syntax.yaml", "a: [1\n", "syntax.yaml is not valid YAML (line 2"),
]


def _make(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if content == "<fifo>":
        os.mkfifo(path)
    elif content == "<dev/zero>":
        return Path("/dev/zero")
    elif content == "<dir>":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_is_one_short_line_and_never_a_hang(tmp_path, name, content, message):
    path = _make(tmp_path, name, content)
    with pytest.raises(UsageError) as error:
        read_config_file(path, str(path)) if name.endswith(".yaml") else read_json(path)
    assert message in _one_line(error, tmp_path)
    assert read_json_or_none(path) is None  # the readers that state less rather than fail


def test_a_name_with_a_nul_byte_is_one_line():
    with pytest.raises(UsageError, match="a\x00b cannot be read"):
        read_json("a\0b")


def test_within_the_bounds_is_read_as_json_and_yaml_read_it(tmp_path):
    nested = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)  # inside the top-level mapping: MAX_DEPTH levels
    (tmp_path / "ok.json").write_text('{"a": ' + nested + ', "n": ' + "9" * 100 + ', "x": NaN}')
    value = read_json(tmp_path / "ok.json")
    assert value["n"] == int("9" * 100) and value["x"] != value["x"]  # NaN: how a diverged run logged its loss
    (tmp_path / "ok.yaml").write_text("base: &b {lr: 0.1, steps: 5}\nrun: *b\n" + _bomb(5))  # 9**5 < 100,000
    data = read_config_file(tmp_path / "ok.yaml")
    assert data["run"] == {"lr": 0.1, "steps": 5} and len(data["l4"]) == 9


SCHEMA = {"chunk_size": int, "lr": float, "name": Opt(str), "splits": {"train": {"chunks": int}}}
TYPE_CASES = [
    ({"lr": 1.0, "splits": {"train": {"chunks": 1}}}, "m.json lacks 'chunk_size'"),
    ({"chunk_size": 1, "lr": 1.0}, "m.json lacks 'splits'"),
    ({"chunk_size": 1, "lr": 1.0, "splits": {}}, "m.json lacks 'splits.train'"),
    ({"chunk_size": True, "lr": 1.0, "splits": {"train": {"chunks": 1}}},
     "m.json: chunk_size must be a whole number (got the boolean True)"),
    ({"chunk_size": 1.5, "lr": 1.0, "splits": {"train": {"chunks": 1}}}, "chunk_size must be a whole number (got"),
    ({"chunk_size": None, "lr": 1.0, "splits": {"train": {"chunks": 1}}}, "m.json: chunk_size must not be null"),
    ({"chunk_size": 1, "lr": "fast", "splits": {"train": {"chunks": 1}}},
     "m.json: lr must be a number (got the string 'fast')"),
    ({"chunk_size": 1, "lr": 1, "name": 7, "splits": {"train": {"chunks": 1}}},
     "m.json: name must be a string (got the number 7)"),
    ({"chunk_size": 1, "lr": 1, "splits": [1, 2]}, "m.json: splits must be a mapping (got the list [1, 2])"),
    ({"chunk_size": 1, "lr": 1, "splits": {"train": {"chunks": "x" * 10_000}}},
     "m.json: splits.train.chunks must be a whole number (got the string 'xxx"),
    ([1, 2], "m.json must be a mapping (got the list [1, 2])"),
]


@pytest.mark.parametrize(("value", "message"), TYPE_CASES)
def test_wrong_types_and_missing_keys_are_one_line_naming_the_field(tmp_path, value, message):
    with pytest.raises(UsageError) as error:
        check_types(value, SCHEMA, "m.json")
    assert message in _one_line(error, tmp_path)


def test_a_type_error_names_the_line_of_the_field_in_the_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"chunk_size": 1, "lr": 1.0, "splits": {"train": {"chunks": "many"}}}, indent=2))
    with pytest.raises(UsageError, match=r"m.json line 6: splits.train.chunks must be a whole number \(got the "
                                         r"string 'many'\); do this"):
        read_json(path, schema=SCHEMA, advice="do this")
    assert read_json_or_none(path, schema=SCHEMA) is None
    assert read_json_or_none(path)["lr"] == 1.0


def test_an_echoed_value_is_cut_short_however_large_or_shared():
    laughs: list = ["lol"] * 9
    for _ in range(40):  # 9**40 strings once expanded: repr() would never return
        laughs = [laughs] * 9
    assert len(short(laughs)) <= SHOWN_CHARS and len(short("é" * 10**6)) <= SHOWN_CHARS
    assert short("eight") == "'eight'"


def test_json_lines_skip_a_cut_line_refuse_a_wrong_one_and_bound_each_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n' + "[" * 100_000 + '\n{"step": 2, "lo')
    rows = list(iter_jsonl(path, schema={"step": Opt(int)}))
    assert [(n, v) for n, _, v in rows if isinstance(v, dict)] == [(1, {"step": 1})]
    assert [str(v) for _, _, v in rows if isinstance(v, UsageError)] == [
        f"{path} line 3: lists or mappings nested deeper than {MAX_DEPTH} levels",
        f"{path} is not valid JSON (line 4, column 13: Unterminated string starting at)"]
    path.write_text('{"step": 1}\n{"step": "two"}\n')
    with pytest.raises(UsageError, match=r"m.jsonl line 2: step must be a whole number \(got the string 'two'\)"):
        list(iter_jsonl(path, schema={"step": Opt(int)}))
    path.write_text('{"a": "' + "x" * 200 + '"}\n{"step": 3}\n')
    rows = list(iter_jsonl(path, max_line_bytes=100))
    assert str(rows[0][2]) == f"{path} line 1 is longer than 100 bytes"
    assert rows[1][0] == 2 and rows[1][2] == {"step": 3}
    assert list(iter_jsonl(tmp_path / "none.jsonl")) == []
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(UsageError, match="fifo.jsonl is a FIFO, not a regular file"):
        list(iter_jsonl(tmp_path / "fifo.jsonl"))


# ------------------------------------------------------------------------------------------ the wired readers

@pytest.mark.parametrize(("command", "make", "message"), [
    ("train", lambda: os.mkfifo("job.yaml"), "--config job.yaml is a FIFO, not a regular file"),
    ("preprocess", lambda: os.symlink("/dev/zero", "job.yaml"), "--config job.yaml is a device, not a regular file"),
], ids=["fifo", "dev-zero-link"])
def test_a_config_that_is_a_fifo_or_a_device_exits_2_with_one_line_unread(cli, tmp_path, monkeypatch, command, make,
                                                                         message):
    monkeypatch.chdir(tmp_path)
    make()
    rc, _, err = cli(command, "--config", "job.yaml")
    assert_one_line_error(rc, err, message)


CONFIG_CASES = [
    ("int.yaml", "dataset_path: d\n\nbatch_size: " + "e" * 5000 + "\n",
     "--config int.yaml line 3: batch_size must be a whole number (got the string 'eeee"),
    ("bomb.yaml", _bomb() + "dataset_path: d\n", "--config bomb.yaml line 6: more than 100,000 values once its "
     "aliases are expanded"),
    ("alias.yaml", _bomb(4) + "dataset_path: d\nbatch_size: *l3\n",
     "--config alias.yaml line 6: batch_size must be a whole number (got the list [[[[...], [...],"),
    ("deep.json", '{"dataset_path": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "--config deep.json line 1: lists or mappings nested deeper than 100 levels"),
    ("seed.json", '{"dataset_path": "d", "seed": ' + "1" * 5000 + "}",
     "--config seed.json line 1: a number of 5000 characters"),
    ("key.yaml", "dataset_path: d\n" + "k" * 1000 + ": 1\n", "unknown setting 'kkkk"),  # YAML's longest key
]


@pytest.mark.parametrize(("name", "content", "message"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_config_file_beyond_the_bounds_is_one_short_line(cli, tmp_path, monkeypatch, name, content, message):
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(content)
    rc, _, err = cli("train", "--config", name)
    assert_one_line_error(rc, err, message)
    assert len(err.strip().splitlines()[-1]) < SHORT_LINE


def _manifest(root: Path, **changes) -> Path:
    """A dataset directory whose manifest.json has preprocess's fields, with `changes` (None: the key removed)."""
    split = {"documents": 3, "words": 30, "bytes": 200, "tokens": 64, "chunks": 2, "dropped_tokens": 0}
    manifest = {"format": "gpt2-dutch/chunks", "tokenizer": {"vocab_size": 300, "eos_token_id": 0},
                "vocab_size": 300, "chunk_size": 32, "dtype": "uint16", "splits": {"train": split, "test": split}}
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = manifest
        for p in parents:
            node[p] = node = dict(node[p])
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    root.mkdir(exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


MANIFEST_CASES = [
    ({"chunk_size": "32"}, "manifest.json line 8: chunk_size must be a whole number (got the string '32'); "
     "preprocess the data again"),
    ({"vocab_size": None}, "manifest.json lacks 'vocab_size'; preprocess the data again"),
    ({"splits.test": None}, "manifest.json lacks 'splits.test'"),
    ({"splits.train.chunks": [2]}, "splits.train.chunks must be a whole number (got the list [2])"),
    ({"splits": "all"}, "manifest.json line 10: splits must be a mapping (got the string 'all')"),
    ({"tokenizer.eos_token_id": "0"}, "tokenizer.eos_token_id must be a whole number (got the string '0')"),
    ({"chunk_size": 0}, "manifest.json: chunk_size must be positive (got 0)"),
]


@pytest.mark.parametrize(("changes", "message"), MANIFEST_CASES)
def test_a_manifest_with_a_missing_or_wrong_typed_field_is_one_line(tmp_path, changes, message):
    with pytest.raises(UsageError) as error:
        read_manifest(_manifest(tmp_path / "d", **changes))
    assert message in _one_line(error, tmp_path)


def test_a_manifest_that_is_a_fifo_or_too_deep_is_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "manifest.json")
    with pytest.raises(UsageError, match="manifest.json is a FIFO, not a regular file; preprocess the data again"):
        read_manifest(tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text('{"splits": ' + "[" * 100_000)
    with pytest.raises(UsageError, match="manifest.json line 1: lists or mappings nested deeper than 100 levels"):
        read_manifest(tmp_path / "e")
    assert read_manifest(_manifest(tmp_path / "ok"))["splits"]["train"]["chunks"] == 2


def test_train_on_a_manifest_with_a_wrong_typed_field_exits_2_with_one_line(cli, tmp_path):
    data = _manifest(tmp_path / "d", **{"splits.train.chunks": "two"})
    rc, _, err = cli("train", "--dataset-path", data, "--output-dir", tmp_path / "runs")
    assert_one_line_error(rc, err, "manifest.json line 16: splits.train.chunks must be a whole number (got the string "
                                   "'two'); preprocess the data again")
    assert not (tmp_path / "runs").exists()


def _run(root: Path, record: dict, metrics: str = '{"step": 1, "loss": 4.0, "tokens": 64}\n') -> Path:
    run = root / "gpt2-dutch-tiny-20260101-000000"
    (run / "final_model").mkdir(parents=True)
    (run / "final_model" / "config.json").write_text(json.dumps({"n_layer": 2, "n_embd": 32, "vocab_size": 300}))
    (run / "run_config.json").write_text(json.dumps({"format": "gpt2-dutch/run", **record}, indent=1))
    (run / "metrics.jsonl").write_text(metrics)
    return run


RUN_CONFIG_CASES = [
    ({"total_steps": "40"}, "line 4: total_steps must be a whole number (got the string '40')"),
    ({"status": ["finished"]}, "line 4: status must be a string (got the list ['finished'])"),
    ({"tokens_per_step": 1.5}, "tokens_per_step must be a whole number (got the number 1.5)"),
    ({"started_at": "x" * 10_000}, None),  # a string, as it should be: read
]


@pytest.mark.parametrize(("record", "message"), RUN_CONFIG_CASES)
def test_a_run_config_with_a_wrong_typed_field_is_one_line_and_the_card_states_less(tmp_path, record, message):
    run = _run(tmp_path, {"model_size": "tiny", **record})
    if message is None:
        assert read_run_config(run) == {"format": "gpt2-dutch/run", "model_size": "tiny", **record}
        return
    with pytest.raises(UsageError) as error:
        read_run_config(run)
    line = _one_line(error, tmp_path)
    assert line.startswith(f"{run / 'run_config.json'} cannot be read (") and message in line
    assert line.endswith("the run directory is damaged")
    assert read_run_config_or_none(run) is None
    facts = card_facts(run)
    assert facts["model"]["size"] is None and facts["model"]["n_layer"] == 2  # what config.json says still shows


def test_a_run_config_fifo_is_refused_unread(tmp_path):
    run = _run(tmp_path, {})
    (run / "run_config.json").unlink()
    os.mkfifo(run / "run_config.json")
    with pytest.raises(UsageError, match=r"run_config.json cannot be read \(is a FIFO, not a regular file\)"):
        read_run_config(run)
    assert read_run_config_or_none(run) is None


def test_metrics_with_a_wrong_typed_field_are_one_line_naming_the_line(tmp_path):
    run = _run(tmp_path, {}, metrics='{"step": 1, "loss": 4.0}\n{"step": 2, "loss": "low"}\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl line 2: loss must be a number \(got the string 'low'\)"):
        read_metrics(run)
    with pytest.raises(UsageError, match="metrics.jsonl line 2: loss"):
        keep_metrics_up_to(run, 1)  # a resume refuses it rather than keeping half
    assert card_facts(run)["train_curve"] == []  # the card states less, it never fails


def test_metrics_that_are_a_fifo_are_refused_unread_and_a_resume_keeps_lines_byte_for_byte(tmp_path):
    lines = '{"step": 1, "loss": 4.0}\n{"step":2,"loss":3.5}\n{"step": 3, "loss": NaN}\n{"step": 4, "lo'
    run = _run(tmp_path, {}, metrics=lines)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    keep_metrics_up_to(run, 2)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 4.0}\n{"step":2,"loss":3.5}\n'
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    with pytest.raises(UsageError, match="metrics.jsonl is a FIFO, not a regular file"):
        read_metrics(run)
    assert card_facts(run)["train_curve"] == []


def test_a_huge_flag_value_is_echoed_cut_short(tmp_path):
    from gpt2_dutch.core.options import parse_duration

    with pytest.raises(UsageError) as error:
        parse_duration("9" * 100_000 + "x")
    line = _one_line(error, tmp_path)
    assert line.startswith("--max-time '9999") and line.endswith("is not a positive duration like 90s, 30m or 2h")
