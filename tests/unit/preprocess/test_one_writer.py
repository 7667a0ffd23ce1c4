"""preprocess has one writer per dataset name (core/ownership.py): a run killed with SIGKILL leaves no worker
alive and resumes with the same command to the byte-identical dataset; of two started at once exactly one
writes, the other is told its PID; --overwrite replaces only what preprocess wrote; --name is a plain name; a
--data-files entry that exists is a file, not a glob."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import DOCS, TINY_PART_MB, assert_one_line_error, write_jsonl

from gpt2_dutch.preprocess import PreprocessConfig, preprocess
from gpt2_dutch.preprocess.parts import KILL_HOOK

MARK = "GPT2_DUTCH_TEST_MARK"  # in the environment of the run under test, and so of every process it starts
VARYING = ("seconds", "encode_seconds", "created")  # the manifest's timings: all else must be equal


def dataset_bytes(path: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    files["manifest.json"] = json.dumps({k: v for k, v in manifest.items() if k not in VARYING}).encode()
    return files


def _cmd(files: list[Path], tok: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpt2_dutch", "preprocess", *[a for f in files for a in ("--data-files", str(f))],
            "--tokenizer", str(tok), "--output-dir", str(out), "--name", "d", "--chunk-size", "16",
            "--part-mb", str(TINY_PART_MB), *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", **extra}


def marked_processes(mark: str) -> list[int]:
    """Live (not zombie) processes whose environment holds MARK=mark: what a run started, wherever it now hangs."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("Z", "X") and needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="looks for orphans in /proc")
@pytest.mark.parametrize("threads", ["1", "2"], ids=["forked-workers", "forkserver-workers"])
def test_a_run_killed_with_sigkill_leaves_no_worker_and_resumes_to_the_same_bytes(tmp_path, mixed_files,
                                                                                  small_tokenizer, threads):
    reference = subprocess.run(_cmd(mixed_files, small_tokenizer, tmp_path / "ref", "--num-workers", "2",
                                    "--threads", threads), env=_env(), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    cmd = _cmd(mixed_files, small_tokenizer, out, "--num-workers", "2", "--threads", threads)
    mark = uuid.uuid4().hex
    # a worker SIGKILLs the main process in the middle of a part, as the OOM killer would; output to a file, not
    # a pipe: an orphan would hold a pipe open, and reading it would never end
    with open(tmp_path / "killed.err", "w") as err:
        killed = subprocess.Popen(cmd, env=_env(**{KILL_HOOK: "f00000-b000009:main", MARK: mark}),
                                  stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        assert killed.wait(120) == -signal.SIGKILL, (tmp_path / "killed.err").read_text()
    deadline = time.monotonic() + 10
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "processes of the killed run live on"
    assert not (out / "d").exists() and (out / ".d.work").is_dir()
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "done by an earlier run" in again.stdout
    assert dataset_bytes(out / "d") == dataset_bytes(tmp_path / "ref" / "d")
    assert sorted(p.name for p in out.iterdir()) == ["d"], "no lock, work or staging left"


@pytest.mark.slow
def test_of_two_runs_of_one_name_started_at_once_exactly_one_writes_and_the_other_names_it(tmp_path, mixed_files,
                                                                                           small_tokenizer):
    out = tmp_path / "out"
    cmd = _cmd(mixed_files, small_tokenizer, out, "--num-workers", "1")
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.pid, p.wait(120), *p.communicate()) for p in procs]
    won = [r for r in results if r[1] == 0]
    lost = [r for r in results if r[1] != 0]
    assert len(won) == 1 and len(lost) == 1, results
    assert_one_line_error(lost[0][1], lost[0][3], f"another preprocess is writing {out / 'd'} now (pid {won[0][0]})")
    assert sorted(p.name for p in out.iterdir()) == ["d"]
    reference = subprocess.run(_cmd(mixed_files, small_tokenizer, tmp_path / "ref", "--num-workers", "1"),
                               env=_env(), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    assert dataset_bytes(out / "d") == dataset_bytes(tmp_path / "ref" / "d")


def test_a_run_refused_because_another_writes_the_name_touches_nothing(tmp_path, small_tokenizer, cli):
    from gpt2_dutch.core.ownership import DirectoryOwner

    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS * 8)
    out = tmp_path / "out"
    (out / ".d.work" / "parts" / "train").mkdir(parents=True)  # the other run's work, in progress
    with DirectoryOwner(out / "d", "preprocess"):
        rc, _, err = cli("preprocess", "--data-files", corpus, "--tokenizer", small_tokenizer, "--output-dir", out,
                         "--name", "d", "--chunk-size", "16")
        assert_one_line_error(rc, err, f"another preprocess is writing {out / 'd'} now (pid {os.getpid()})")
        assert sorted(p.name for p in out.iterdir()) == [".d.lock", ".d.work"]
        assert (out / ".d.work" / "parts" / "train").is_dir()


@pytest.mark.parametrize(("held_shared", "shard", "refused"), [
    (True, True, False),  # another shard of the run writes: this shard goes on beside it
    (True, False, True),  # a shard writes: a whole run is refused
    (False, True, True),  # a whole run or a merge writes: a shard is refused
], ids=["shard-beside-a-shard", "run-while-a-shard-writes", "shard-while-a-run-writes"])
def test_the_shards_of_one_run_share_the_name_and_nothing_else_does(tmp_path, small_tokenizer, held_shared, shard,
                                                                   refused):
    from gpt2_dutch.core.errors import UsageError
    from gpt2_dutch.core.ownership import DirectoryOwner

    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS * 8)
    out = tmp_path / "out"
    out.mkdir()
    kw = {"shard_index": 1, "num_shards": 2} if shard else {}
    cfg = PreprocessConfig(data_files=[str(corpus)], tokenizer=str(small_tokenizer), chunk_size=16,
                           output_dir=str(out), name="d", **kw)
    with DirectoryOwner(out / "d", "preprocess", shared=held_shared):
        if refused:
            with pytest.raises(UsageError, match=f"another preprocess is writing {out / 'd'} now"):
                preprocess(cfg)
            assert sorted(p.name for p in out.iterdir()) == [".d.lock"]
        else:
            assert preprocess(cfg) == out / ".d.work"
            assert (out / ".d.work" / "done-00001-of-00002.json").is_file()
            assert (out / ".d.lock").exists(), "still held by the other shard"
    assert not (out / ".d.lock").exists()


def test_a_shard_that_fails_leaves_the_work_of_a_shard_beside_it(tmp_path, small_tokenizer):
    from gpt2_dutch.core.errors import UsageError
    from gpt2_dutch.core.ownership import DirectoryOwner

    (tmp_path / "bad.jsonl").write_text('{"text": kapot}\n')
    out = tmp_path / "out"
    out.mkdir()
    cfg = PreprocessConfig(data_files=[str(tmp_path / "bad.jsonl")], tokenizer=str(small_tokenizer),
                           output_dir=str(out), name="d", shard_index=0, num_shards=2)
    with DirectoryOwner(out / "d", "preprocess", shared=True):  # the other shard, still at work
        with pytest.raises(UsageError, match="not valid JSON"):
            preprocess(cfg)
        assert (out / ".d.work" / "plan.json").is_file(), "the other shard's work is still there"
        assert sorted(p.name for p in out.iterdir()) == [".d.lock", ".d.work"]


# --------------------------------------------------------------------------------- --overwrite: only what we made

@pytest.fixture(scope="module")
def our_dataset(tmp_path_factory, small_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("ours")
    corpus = write_jsonl(root / "c.jsonl", DOCS * 8)
    return preprocess(PreprocessConfig(data_files=[str(corpus)], tokenizer=str(small_tokenizer), chunk_size=16,
                                       output_dir=str(root / "out"), name="x"))


def _add(path: Path, content: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)


FOREIGN = [
    ({"notes.txt": "mijn aantekeningen"}, "holds notes.txt that preprocess did not write; move it"),
    ({"runs/run-1/run_config.json": "{}"}, "holds runs/ that preprocess did not write; move it"),
    ({"notes.txt": "n", "runs/": None}, "holds notes.txt and runs/ that preprocess did not write; move them"),
    ({"train/mine.arrow": "x"}, "holds train/mine.arrow that preprocess did not write; move it"),
    ({"a": "1", "b": "2", "c": "3"}, "holds a, b and c that preprocess did not write; move them"),
    ({"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}, "holds a, b, c and 2 more that preprocess did not write"),
    ({".hidden": "x"}, "holds .hidden that preprocess did not write; move it"),
    ({"link": "->test"}, "holds link that preprocess did not write; move it"),  # a link is never ours
    ({"train/sub/": None}, "holds train/sub/ that preprocess did not write; move it"),
]


@pytest.mark.parametrize(("extra", "message"), FOREIGN, ids=[m.split(" that")[0] for _, m in FOREIGN])
def test_overwrite_refuses_a_dataset_holding_what_preprocess_did_not_write(tmp_path, our_dataset, small_tokenizer,
                                                                           cli, extra, message):
    out = tmp_path / "out"
    shutil.copytree(our_dataset, out / "x")
    for rel, content in extra.items():
        if content is not None and content.startswith("->"):
            (out / "x" / rel).symlink_to(out / "x" / content[2:], target_is_directory=True)
        else:
            _add(out / "x" / rel.rstrip("/"), content)
    before = {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS * 8)
    rc, _, err = cli("preprocess", "--data-files", corpus, "--tokenizer", small_tokenizer, "--output-dir", out,
                     "--name", "x", "--chunk-size", "8", "--overwrite")
    assert_one_line_error(rc, err, f"{out / 'x'} {message}")
    assert err.rstrip().endswith("or choose another --name")
    after = {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}
    assert after == before, "nothing deleted, nothing added"


def test_overwrite_replaces_a_dataset_holding_only_what_preprocess_and_datasets_write(tmp_path, our_dataset,
                                                                                      small_tokenizer, cli):
    out = tmp_path / "out"
    shutil.copytree(our_dataset, out / "x")
    (out / "x" / "train" / "cache-0123abcd.arrow").write_bytes(b"datasets' map cache")  # load_from_disk().map()
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS * 8)
    rc, stdout, err = cli("preprocess", "--data-files", corpus, "--tokenizer", small_tokenizer, "--output-dir", out,
                          "--name", "x", "--chunk-size", "8", "--overwrite")
    assert rc == 0 and "8-token chunks" in stdout, err
    assert json.loads((out / "x" / "manifest.json").read_text())["chunk_size"] == 8
    assert sorted(p.name for p in out.iterdir()) == ["x"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("new_in_place", [False, True], ids=["killed-between-the-renames", "killed-deleting-the-old"])
def test_a_dataset_set_aside_by_a_killed_overwrite_is_put_back_or_removed(tmp_path, our_dataset, small_tokenizer,
                                                                          cli, capsys, new_in_place):
    out = tmp_path / "out"
    aside = out / f".x.old-{_dead_pid()}"
    shutil.copytree(our_dataset, aside)
    (out / ".x.lock").write_text("1 elsewhere\n")  # the killed run's lock file: not locked any more
    if new_in_place:
        shutil.copytree(our_dataset, out / "x")
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS * 8)
    args = ["preprocess", "--data-files", corpus, "--tokenizer", small_tokenizer, "--output-dir", out, "--name", "x",
            "--chunk-size", "8"]
    if new_in_place:
        rc, _, err = cli(*args, "--overwrite")
        assert rc == 0, err
    else:  # the old dataset is back where it was, and is not replaced without --overwrite
        rc, _, err = cli(*args)
        assert_one_line_error(rc, err, "already exists; pass --overwrite")
        assert "note: put back" in err
        assert dataset_bytes(out / "x") == dataset_bytes(our_dataset)
    assert sorted(p.name for p in out.iterdir()) == ["x"]


# ---------------------------------------------------------------------------------------------- names are names

BAD_NAMES = [
    ("", "--name must not be empty"),
    ("a/b", "--name 'a/b' must be a plain directory name (no /)"),
    ("/abs", "--name '/abs' must be a plain directory name (no /)"),
    ("../x", "--name '../x' must be a plain directory name (no /)"),
    (".", "--name '.' must be a plain directory name, not . or .."),
    ("..", "--name '..' must be a plain directory name, not . or .."),
    ("x" * 201, "--name is 201 bytes long; at most 200"),
    ("é" * 101, "--name is 202 bytes long; at most 200"),
    ("a\nb", "--name 'a\\nb' must be a plain directory name (no control characters)"),
    ("a\0b", "--name 'a\\x00b' must be a plain directory name (no control characters)"),
]


@pytest.mark.parametrize(("name", "message"), BAD_NAMES, ids=[repr(n)[:20] for n, _ in BAD_NAMES])
def test_a_name_that_is_not_a_plain_name_is_one_line(tmp_path, cli, name, message):
    if "\0" in name:  # no argv can hold a NUL; a --config file can
        cfg = tmp_path / "c.yaml"
        cfg.write_text(json.dumps({"name": name, "sample": True}))
        rc, _, err = cli("preprocess", "--config", cfg, "--output-dir", tmp_path / "out")
    else:
        rc, _, err = cli("preprocess", "--sample", "--name", name, "--output-dir", tmp_path / "out")
    assert_one_line_error(rc, err, message)
    assert "\n" not in err.strip()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["x" * 200, "é" * 100, "a[1]", "chunked_10k", ".hidden", "met spatie"])
def test_a_plain_name_is_taken(name):
    assert PreprocessConfig(sample=True, name=name).name == name


def test_a_long_file_stem_gives_a_default_name_within_the_limit():
    cfg = PreprocessConfig(data_files=["x" * 250 + ".jsonl"])
    assert cfg.name is not None and cfg.name.startswith("chunked_x") and len(cfg.name.encode()) <= 200


# ------------------------------------------------------------------------------- a data file is a file, not a glob

def test_a_data_file_whose_name_looks_like_a_glob_is_taken_literally(tmp_path, small_tokenizer):
    from gpt2_dutch.data.sources import expand_data_files

    literal = write_jsonl(tmp_path / "a[1].jsonl", DOCS * 8)
    write_jsonl(tmp_path / "a1.jsonl", DOCS[:1])  # what the pattern a[1].jsonl would match as a glob
    assert expand_data_files([str(literal)]) == [literal]
    assert expand_data_files([str(tmp_path / "a[1]*.jsonl")]) == [tmp_path / "a1.jsonl"]  # a glob still globs
    assert expand_data_files([str(tmp_path / "*.jsonl")]) == [tmp_path / "a1.jsonl", literal]
    path = preprocess(PreprocessConfig(data_files=[str(literal)], tokenizer=str(small_tokenizer), chunk_size=16,
                                       output_dir=str(tmp_path / "out")))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["test"]["documents"] == len(DOCS) * 8
