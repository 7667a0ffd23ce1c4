"""preprocess/merge.py: shards merged equal one run; a shard with other settings is refused."""

from __future__ import annotations

import json

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
