"""The command line as a whole (__main__.py): light --help, one name per idea (old spellings as hidden aliases), and
a new run from a run's run_config.json."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
from helpers import assert_one_line_error

from gpt2_dutch.__main__ import COMMANDS, command_config, command_parser
from gpt2_dutch.train import TrainConfig

HEAVY = ["torch", "transformers", "datasets", "pyarrow", "numpy", "tiktoken", "tokenizers", "matplotlib"]


def _heavy_modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running `code` (which must not fail)."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_building_the_full_parser_imports_nothing_heavy():
    assert _heavy_modules_after("from gpt2_dutch.__main__ import build_parser\nbuild_parser()") == []


def test_every_commands_help_imports_nothing_heavy():
    code = f"""
import contextlib, io
from gpt2_dutch.__main__ import main
for argv in [["--help"]] + [[c, "--help"] for c in {list(COMMANDS)!r}]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    assert out.getvalue().startswith("usage: gpt2-dutch"), (argv, out.getvalue()[:200])
"""
    assert _heavy_modules_after(code) == []


# ------------------------------------------------------------------------------------------ one name per idea


# (command, old spelling, new spelling, value (None: a switch)): the old one keeps working for a release, hidden
# from --help
RENAMED = [
    ("generate", "--dtype", "--precision", "fp32"),
    ("evaluate", "--dtype", "--precision", "bf16"),
    ("evaluate", "--max-chunks", "--eval-chunks", "5"),
    ("preprocess", "--num-proc", "--threads", "3"),
    ("bench", "--budget", "--max-time", "90s"),
    ("serve", "--max-batch", "--batch-size", "8"),
    ("train", "--hub-private", "--private", None),
    ("train", "--num-workers", "--dataloader-workers", "2"),
]


@pytest.mark.parametrize(("command", "old", "new", "value"), RENAMED, ids=[f"{c}{o}" for c, o, _, _ in RENAMED])
def test_an_old_spelling_still_works_hidden_and_with_a_notice(capsys, command, old, new, value):
    parser = command_parser(command)
    dest, given = new[2:].replace("-", "_"), [] if value is None else [value]
    assert vars(parser.parse_args([old, *given]))[dest] == vars(parser.parse_args([new, *given]))[dest]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{old} is deprecated, use {new}" in err
    help_text = parser.format_help()
    # the old flag as a whole word: `bench --budgets` (several budgets) is not `--budget` (old --max-time)
    assert new in help_text and re.search(rf"{re.escape(old)}(?![\w-])", help_text) is None


@pytest.mark.parametrize(("command", "default"), [("evaluate", "fp32"), ("generate", "auto"), ("serve", "auto")])
def test_precision_defaults_to_fp32_only_where_a_score_must_compare_across_machines(command, default):
    from gpt2_dutch.evaluate import EvaluateConfig
    from gpt2_dutch.generate import GenerateConfig
    from gpt2_dutch.serve import ServeConfig

    cls = {"evaluate": EvaluateConfig, "generate": GenerateConfig, "serve": ServeConfig}[command]
    assert {f.name: f.default for f in dataclasses.fields(cls)}["precision"] == default
    assert f"(default: {default})" in " ".join(command_parser(command).format_help().split())


def test_use_wandb_is_an_old_way_of_saying_report_to_wandb(capsys):
    parser = command_parser("train")
    args = parser.parse_args(["--dataset-path", "d", "--use-wandb"])
    assert command_config("train", args).report_to == "wandb"
    assert "--use-wandb is deprecated, use --report-to wandb" in capsys.readouterr().err
    assert "--use-wandb" not in parser.format_help() and "the seed's flag" not in parser.format_help()


def test_a_bad_value_for_an_old_spelling_is_still_one_line(cli):
    rc, _, err = cli("preprocess", "--num-proc", "0")
    assert_one_line_error(rc, err, "--threads must be at least 1 (got 0)")


# ------------------------------------------------------------------------------------------------ --config


# ------------------------------------------------------------------------------------------- run records


@pytest.mark.slow
def test_train_config_run_config_json_starts_a_new_run_with_the_same_settings(cli, tiny_dataset, tmp_path):
    out = tmp_path / "runs"
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, "--model-size", "tiny", "--batch-size", "4",
                     "--max-steps", "2", "--learning-rate", "1e-3", "--seed", "5", "--output-dir", out)
    assert rc == 0, err
    (first,) = [p for p in out.iterdir() if not p.name.endswith("latest")]
    recorded = json.loads((first / "run_config.json").read_text())
    assert recorded["format"] == TrainConfig.RECORD_FORMAT and recorded["status"] == "finished"

    rc, _, err = cli("train", "--config", first / "run_config.json", "--max-steps", "3")
    assert rc == 0, err
    (second,) = [p for p in out.iterdir() if not p.name.endswith("latest") and p != first]
    replayed = json.loads((second / "run_config.json").read_text())
    assert json.loads((first / "run_config.json").read_text()) == recorded  # the old run is untouched
    assert replayed["total_steps"] == 3 and replayed["max_steps"] == 3  # the flag overrode the file
    same = ["dataset_path", "model_size", "batch_size", "learning_rate", "seed", "precision", "output_dir", "warmup"]
    assert {k: replayed[k] for k in same} == {k: recorded[k] for k in same}
