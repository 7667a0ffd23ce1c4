"""demo.py: the demo ends with the serve command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import front


@pytest.mark.slow
def test_demo_ends_with_the_serve_command(tmp_path, capsys):
    from gpt2_dutch.demo import DemoConfig, demo

    result = demo(DemoConfig(quick=True, output_dir=str(tmp_path)))
    out = capsys.readouterr().out.strip().splitlines()
    run = Path(result["run"])
    assert out[-1].split("#")[0].strip() == f"gpt2-dutch serve --model-path {run}"
    meta = front((run / "final_model" / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["metrics"][2]["value"] == round(
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
         if "eval_bpb" in line][-1]["eval_bpb"], 4)
    assert "the Dutch sample shipped with gpt2-dutch (dutch_sample.jsonl)" in (run / "final_model" / "README.md"
                                                                                  ).read_text()
