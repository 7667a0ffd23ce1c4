"""The first-run experience: `gpt2-dutch demo --quick` end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2_dutch.demo import DemoConfig, demo


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    result = demo(DemoConfig(quick=True, output_dir=str(tmp_path)))
    out = capsys.readouterr().out
    run = Path(result["run"])
    assert (run / "final_model" / "model.safetensors").is_file() and (run / "loss.png").is_file()
    # 2.70 measured; a model that memorised the sample instead (the old 90 s budget) scored 5.0
    assert 0 < result["eval"]["bits_per_byte"] < 3.5 and len(result["samples"]) == 3
    assert "demo finished" in out and "bits per byte" in out and str(run / "loss.png") in out
    assert out.count(">>> ") == 3
