"""preprocess/merge.py: shards merged equal one run; a shard with other settings is refused."""

from __future__ import annotations

import json
import os

import pytest
from helpers import TINY_PART_MB, assert_same_dataset, run

from gpt2_dutch.core.errors import UsageError


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["files", "blocks"])
def test_three_shards_merged_equal_one_run(tmp_path, mixed_files, small_tokenizer, layout, capsys):
    files = mixed_files if layout == "files" else mixed_files[:1]  # 5 files: whole files; 1 file: its blocks
    reference = run(tmp_path / "ref", files, small_tokenizer)
    out = tmp_path / "out"
    kw = {"part_mb": TINY_PART_MB, "num_shards": 3}
    for index in (2, 0, 1):  # the order the scheduler runs them in does not matter
        path = run(out, files, small_tokenizer, shard_index=index, **kw)
        assert path == out / ".d.work" and not (out / "d").exists()
        assert f"shard {index} of 3 done" in capsys.readouterr().err
    merged = run(out, files, small_tokenizer, merge=True, part_mb=TINY_PART_MB)
    assert_same_dataset(reference, merged)
    assert json.loads((merged / "manifest.json").read_text())["shards"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["d"]


def test_a_shard_with_other_settings_is_refused(tmp_path, mixed_files, small_tokenizer):
    run(tmp_path, mixed_files, small_tokenizer, shard_index=0, num_shards=2)
    with pytest.raises(UsageError, match="holds the work of a preprocess with other settings"):
        run(tmp_path, mixed_files, small_tokenizer, shard_index=1, num_shards=2, part_mb=1.0)


@pytest.mark.parametrize("content", ["<fifo>", "<dev/zero>", "[" * 100_000, '{"format": ' + "9" * 5000 + "}"],
                         ids=["fifo", "dev-zero", "deep", "long-number"])
def test_work_files_and_a_manifest_are_read_bounded_and_a_bad_one_is_not_ours(tmp_path, content, no_hang):
    """plan.json, a shard's done marker and the manifest --overwrite looks at go through core/reading: a FIFO or a
    device is never opened, nothing deep or huge is parsed; a damaged one is no plan (the work starts over), a shard
    not done (it runs again), not a dataset of ours (--overwrite refuses it)."""
    from gpt2_dutch.preprocess import is_our_dataset
    from gpt2_dutch.preprocess.merge import WorkDir

    work = WorkDir(tmp_path / ".d.work")
    work.parts.mkdir(parents=True)
    dataset = tmp_path / "d"
    dataset.mkdir()
    for path in (work.path / "plan.json", work.path / "done-00000-of-00001.json", dataset / "manifest.json"):
        if content == "<fifo>":
            os.mkfifo(path)
        elif content == "<dev/zero>":
            path.symlink_to("/dev/zero")
        else:
            path.write_text(content)
    assert work.plan() is None and not is_our_dataset(dataset)
    with pytest.raises(UsageError, match="1 of 1 shards are not done"):
        work.shard_results(1)


def test_a_done_marker_with_fields_of_the_wrong_type_is_a_shard_not_done(tmp_path):
    from gpt2_dutch.preprocess.merge import WorkDir

    work = WorkDir(tmp_path / ".d.work")
    work.parts.mkdir(parents=True)
    good = {"shard": 0, "num_shards": 2, "has_test": False, "parts": {"train": [], "test": []}}
    (work.path / "done-00000-of-00002.json").write_text(json.dumps(good))
    for bad in [{**good, "shard": "1"}, {**good, "shard": 1, "parts": {"train": [5], "test": []}},
                {**good, "shard": 1, "parts": []}]:
        (work.path / "done-00001-of-00002.json").write_text(json.dumps(bad))
        with pytest.raises(UsageError, match=r"1 of 2 shards are not done \(--shard-index 1\)"):
            work.shard_results(2)
    (work.path / "done-00001-of-00002.json").write_text(json.dumps({**good, "shard": 1}))
    assert work.shard_results(2) == (2, {"train": [], "test": []}, False)
