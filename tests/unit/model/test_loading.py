"""model/loading.py: a model is found from its run directory, final_model or -latest link."""

from __future__ import annotations

import pytest

from gpt2_dutch.model.loading import load_model

# Every test here needs `tiny_run`, a model trained for 300 steps until it knows the corpus by heart (its
# continuations are asserted), which takes longer than the whole fast suite may; test_fault_matrix.py,
# on random models, is the fast part for generate and evaluate.
pytestmark = pytest.mark.slow


def test_model_path_accepts_run_dir_final_model_and_latest_link(tiny_run):
    for path in (tiny_run, tiny_run / "final_model", tiny_run.parent / "gpt2-dutch-nano-latest"):
        assert load_model(path, "cpu", "fp32")[2] == tiny_run / "final_model" or \
            load_model(path, "cpu", "fp32")[2].resolve() == (tiny_run / "final_model").resolve()
