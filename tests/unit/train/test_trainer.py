"""train's console (a bar and one line per evaluation, JSON lines, quiet) and its checkpoint guarantees
(a checkpoint-N directory exists only once complete; rotation never deletes the checkpoint just written)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import poison_training_step

from gpt2_dutch.runs.records import checkpoint_problem

TINY = ["--model-size", "tiny", "--batch-size", "4", "--precision", "fp32"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _lines(err: str) -> list[str]:
    """What a terminal shows: each line as left after its last carriage return (a bar redraws with `\\r`)."""
    return [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()]


def _run_dir(out: Path) -> Path:
    return next(out.glob("gpt2-dutch-tiny-2*"))


# ----------------------------------------------------------------------------- the console


def _check_text_console(err: str, run: Path) -> None:
    assert not any(line.lstrip().startswith("{") for line in err.replace("\r", "\n").split("\n")), err
    assert "{'loss'" not in err and "'grad_norm'" not in err  # the Trainer's raw dicts
    evals = [r for r in _metrics(run) if "eval_loss" in r]
    shown = [line for line in _lines(err) if re.match(r"step \d+: eval loss ", line)]
    assert evals and len(shown) == len(evals), err
    for line, record in zip(shown, evals, strict=True):
        assert line.startswith(f"step {record['step']}: eval loss {record['eval_loss']:.4f}, "
                               f"{record['eval_bpb']:.3f} bits/byte"), line
    # a warning is a whole line of its own, not glued into the bar's
    assert "warning: step 2: non-finite loss or gradient, update skipped (1 in a row; the run stops at 5)" in \
        _lines(err)
    total = json.loads((run / "run_config.json").read_text())["total_steps"]
    bars = re.findall(r"(\d+)/(\d+) \[[^\]]*loss=", err)
    assert bars and bars[-1] == (str(total), str(total)), bars[-3:]  # the bar went to the run's length
    assert _lines(err)[-1].startswith("final model: ")


@pytest.mark.slow
def test_text_console_is_a_bar_and_one_line_per_evaluation(tiny_dataset, tmp_path, cli, monkeypatch):
    poison_training_step(monkeypatch, 2)
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "6",
                     "--eval-every", "3", "--log-every", "1")
    assert rc == 0, err
    _check_text_console(err, _run_dir(tmp_path))
    assert len([line for line in _lines(err) if " eval loss " in line]) == 2  # steps 3 and 6


@pytest.mark.slow
def test_text_console_of_a_max_time_run_corrects_the_bars_total(tiny_dataset, tmp_path, cli, monkeypatch):
    """--max-time: the bar has no total until the step count is fitted, then the fitted one. The budget's clock
    is a fake one (0.5 s a step), so 3 s fit the same steps on any machine."""
    from gpt2_dutch.train.trainer import MaxTimeCallback

    clock = [0.0]

    def tick(self) -> float:  # noqa: ANN001 - two readings a step
        clock[0] += 0.25
        return clock[0]

    monkeypatch.setattr(MaxTimeCallback, "now", tick)
    poison_training_step(monkeypatch, 2)
    # a --learning-rate: else choosing one for the budget measures speed first, whose forwards the poison counts
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-time", "3s",
                     "--learning-rate", "2e-3")
    assert rc == 0, err
    _check_text_console(err, _run_dir(tmp_path))
    assert "0step [" in err and "/1000000000" not in err  # no placeholder total before the fit


def _simulate_max_time(kind: str, tmp_path: Path, monkeypatch, seconds_per_step) -> dict:  # noqa: ANN001
    """MaxTimeCallback over a simulated 100 s run whose steps take seconds_per_step(step) on a fake clock,
    called as the Trainer calls it, with a 5 s evaluation and checkpoint every 50 steps (not part of the
    budget); returns, among others, the seconds of training (data and steps)."""
    from gpt2_dutch.train import trainer as trainer_module
    from gpt2_dutch.train.schedule import make_schedule
    from gpt2_dutch.train.trainer import MaxTimeCallback

    clock = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])
    (tmp_path / "run_config.json").write_text(json.dumps({"total_steps": 10**9}))
    schedule = make_schedule(kind, 10**9, 5, 0.25)  # until the fit, the warmup of a 100-step run (as run.py)
    cb = MaxTimeCallback(100.0, schedule, 0.05, tmp_path, 10**9, auto_eval=True, auto_save=True)
    fits: list[int] = []
    cb.fit_listeners.append(fits.append)
    state = SimpleNamespace(global_step=0, max_steps=10**9, is_world_process_zero=True)
    args = SimpleNamespace(max_steps=10**9)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    cb.on_train_begin(args, state, control)
    lrs, totals, training = [], [], 0.0
    while state.global_step < state.max_steps and not control.should_training_stop:
        clock[0] += 0.001  # the batch is loaded before on_step_begin
        training += 0.001
        cb.on_step_begin(args, state, control)
        lrs.append(schedule(state.global_step))
        state.global_step += 1
        clock[0] += seconds_per_step(state.global_step)
        training += seconds_per_step(state.global_step)
        cb.on_step_end(args, state, control)
        totals.append(state.max_steps)
        if state.global_step % 50 == 0:  # an evaluation, then a checkpoint: on top of the budget
            clock[0] += 4.0
            cb.on_evaluate(args, state, control)
            clock[0] += 1.0
            cb.on_save(args, state, control)
    return {"seconds": training, "lrs": lrs, "totals": totals, "fits": fits, "schedule": schedule,
            "run_config": json.loads((tmp_path / "run_config.json").read_text())}


def test_max_time_refits_the_length_in_wsds_stable_phase_so_a_slowdown_still_ends_on_time(tmp_path, monkeypatch):
    """The first fit comes from the first steps; when the steps then slow down (here from 0.1 to 0.2 s), a
    wsd run refits its length while its learning rate is still at the peak, so it ends near its budget instead
    of running ~2x over it, and its learning rate never jumps (1 until the cooldown, then down to 0)."""
    run = _simulate_max_time("wsd", tmp_path, monkeypatch, lambda step: 0.1 if step <= 20 else 0.2)
    assert 97 <= run["seconds"] <= 103, run["seconds"]
    first = run["totals"][3]  # the first fit, after 3 measured steps of 0.1 s: ~1000 steps
    assert 990 <= first <= 1000
    total = run["totals"][-1]
    assert total == len(run["lrs"]) == run["run_config"]["total_steps"] and 490 < total < 530
    assert run["run_config"]["seconds_per_step"] > 0.19  # the last fit's measured speed
    warmup = run["schedule"].warmup_steps
    assert warmup == int(0.05 * first)  # from the first fit, kept by the refits
    rising = run["lrs"][4:warmup]  # after the first fit (at step 4) up to the end of the warmup
    assert all(a < b for a, b in zip(rising, rising[1:], strict=False)) and run["lrs"][warmup] == 1.0
    after = run["lrs"][warmup:]
    stable = after[:after.index(next(lr for lr in after if lr < 1.0))]
    assert set(stable) == {1.0} and len(stable) > 0.65 * total  # the peak, never interrupted
    decay = after[len(stable):]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] < 0.01  # then straight down to ~0
    assert run["fits"] == [first]  # listeners (the evaluations' size) hear the first fit only: evals stay comparable


@pytest.mark.parametrize("kind, slowdown", [("cosine", True), ("wsd", False)])
def test_max_time_keeps_its_first_fit_when_a_refit_would_bend_the_schedule_or_is_not_needed(kind, slowdown,
                                                                                           tmp_path, monkeypatch):
    """A cosine's learning rate depends on the length at every step, so a refit would make it jump: a cosine
    run keeps its first fit (and overruns a slowdown). A steady wsd run's refits change nothing."""
    run = _simulate_max_time(kind, tmp_path, monkeypatch, lambda step: 0.2 if slowdown and step > 20 else 0.1)
    first = run["totals"][3]
    assert 990 <= first <= 1000
    if kind == "cosine":
        assert set(run["totals"][3:]) == {first}
    else:  # refits only correct the first fit's rounding
        assert max(abs(total - first) for total in run["totals"][3:]) <= 2
    assert run["seconds"] == pytest.approx(20 * 0.101 + (first - 20) * (0.201 if slowdown else 0.101), abs=0.1)
    assert run["totals"][-1] == len(run["lrs"])  # it trained to the fit (over budget after a slowdown)


@pytest.mark.slow
def test_json_console_prints_the_records_of_metrics_jsonl(tiny_dataset, tmp_path, cli):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "4",
                     "--eval-every", "2", "--log-every", "1", "--log-format", "json")
    assert rc == 0, err
    assert "\r" not in err  # no bar
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records == _metrics(_run_dir(tmp_path))
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert len([r for r in records if "loss" in r]) == 4
    others = [line for line in err.splitlines() if not line.startswith("{")]
    assert [line.split(" ")[0] for line in others] == ["training", "final"], others


@pytest.mark.slow
def test_quiet_prints_only_the_final_line(tiny_dataset, tmp_path, cli):
    rc, out, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "4",
                       "--eval-every", "2", "--log-every", "1", "--quiet")
    assert rc == 0, err
    assert "\r" not in err and out == ""
    assert err.splitlines() == [f"final model: {_run_dir(tmp_path) / 'final_model'}  (loss curve: "
                                f"{_run_dir(tmp_path) / 'loss.png'})"]
    assert len(_metrics(_run_dir(tmp_path))) > 4  # the records still go to metrics.jsonl


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_a_checkpoint_is_written_beside_its_final_name_and_renamed_complete(tiny_dataset, tmp_path, monkeypatch):
    """At the last write of every save (the RNG state, after weights and optimizer), checkpoint-N does not exist
    yet: a kill at any moment of the save leaves no checkpoint-N without its files."""
    from transformers import Trainer

    from gpt2_dutch.train import TrainConfig, train

    real, seen = Trainer._save_rng_state, []

    def observe(self, output_dir):
        root = Path(output_dir).parent.parent
        seen.append((Path(output_dir).relative_to(root).as_posix(), sorted(p.name for p in root.iterdir()),
                     sorted(p.name for p in Path(output_dir).iterdir())))
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", observe)
    run = train(TrainConfig(dataset_path=str(tiny_dataset), model_size="tiny", batch_size=4, precision="fp32",
                            output_dir=str(tmp_path), max_steps=6, save_every=2, eval_every=6, keep_checkpoints=2))
    assert [where for where, _, _ in seen] == [".staging/checkpoint-2", ".staging/checkpoint-4",
                                               ".staging/checkpoint-6"]
    assert [names for _, names, _ in seen] == [[".staging"], [".staging", "checkpoint-2"],
                                               [".staging", "checkpoint-2", "checkpoint-4"]]
    assert all({"model.safetensors", "optimizer.pt"} <= set(files) for _, _, files in seen)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_a_kill_mid_save_leaves_only_complete_checkpoints_and_the_run_resumes(tiny_dataset, tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys
        from transformers import Trainer
        from gpt2_dutch.__main__ import main

        real = Trainer._save_rng_state

        def killed(self, output_dir):  # weights and optimizer of checkpoint-4 are written, the rest is not
            if output_dir.endswith("checkpoint-4"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, output_dir)

        Trainer._save_rng_state = killed
        sys.exit(main(sys.argv[1:]))
    """)
    cmd = ["train", "--dataset-path", str(tiny_dataset), *TINY, "--output-dir", str(tmp_path), "--max-steps", "6",
           "--save-every", "2", "--eval-every", "6"]
    r = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    checkpoints = _run_dir(tmp_path) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".staging", "checkpoint-2"]
    assert checkpoint_problem(checkpoints / "checkpoint-2") is None
    r = subprocess.run([sys.executable, "-m", "gpt2_dutch", *cmd, "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming at step 2" in r.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert all(checkpoint_problem(p) is None for p in checkpoints.iterdir())


def _checkpoints(root: Path, *steps: int) -> None:
    for step in steps:
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")


@pytest.mark.parametrize(("keep", "left"), [(1, ["checkpoint-10"]), (2, ["checkpoint-10", "checkpoint-12"]),
                                            (3, ["checkpoint-10", "checkpoint-12", "checkpoint-8"])],
                         ids=["keep-1", "keep-2", "keep-3"])
def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path, keep, left):
    """Resumed from checkpoint-8 with a leftover checkpoint-12 (say, a damaged one the resume skipped), the run
    has just written checkpoint-10: that one is kept, whatever --keep-checkpoints is."""
    from gpt2_dutch.train.trainer import GPT2Trainer

    _checkpoints(tmp_path, 8, 10, 12)
    GPT2Trainer._prune_checkpoints(SimpleNamespace(keep_checkpoints=keep), tmp_path / "checkpoint-10")
    assert sorted(p.name for p in tmp_path.iterdir()) == left


def test_the_trainers_own_rotation_would_delete_the_checkpoint_just_written(tmp_path):
    """Why GPT2Trainer rotates itself rather than through `save_total_limit` (see its _save_checkpoint)."""
    from transformers.trainer_utils import rotate_checkpoints

    _checkpoints(tmp_path, 8, 12)
    _checkpoints(tmp_path, 10)  # written last: the newest by time, but not by step
    past = os.stat(tmp_path / "checkpoint-8").st_mtime
    os.utime(tmp_path / "checkpoint-10", (past + 0.5, past + 0.5))  # saves less than a second apart
    rotate_checkpoints(str(tmp_path), save_total_limit=1, use_mtime=True)  # what Trainer._save_checkpoint calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12"]


# ----------------------------------------------------------------------------- --ema-horizon


def _ema_steps(horizon: float, total_steps: int, weights: list[float]):
    """A WeightEMA fed one step per value of `weights` (a 1-parameter model set to each in turn)."""
    import torch

    from gpt2_dutch.train.schedule import make_schedule
    from gpt2_dutch.train.trainer import WeightEMA

    model = torch.nn.Linear(1, 1, bias=False)
    ema = WeightEMA(horizon, make_schedule("wsd", total_steps, 0, 0.2))
    for w in weights:
        with torch.no_grad():
            model.weight.fill_(w)
        ema.on_step_end(None, None, None, model=model)
    return ema, model


def test_the_weight_average_starts_at_the_first_steps_weights_and_takes_one_horizonth_of_each_step():
    ema, _ = _ema_steps(0.1, 100, [1.0, 2.0, 4.0])  # a tenth of a 100-step run: each step enters with 1/10
    assert ema.weight_of_new_step() == pytest.approx(0.1)
    assert float(ema.average["weight"]) == pytest.approx((0.9 * 1.0 + 0.1 * 2.0) * 0.9 + 0.1 * 4.0)
    ema, _ = _ema_steps(4, 100, [1.0, 2.0])  # a horizon in steps
    assert float(ema.average["weight"]) == pytest.approx(0.75 * 1.0 + 0.25 * 2.0)
    from gpt2_dutch.train.plan import UNFITTED

    ema, _ = _ema_steps(0.1, UNFITTED, [1.0, 2.0, 4.0])  # a --max-time run before its fit: the weights
    assert float(ema.average["weight"]) == 4.0


def test_the_weight_average_round_trips_through_a_checkpoint_exactly_and_a_missing_one_is_one_line(tmp_path):
    import torch

    from gpt2_dutch.core.errors import UsageError

    ema, model = _ema_steps(0.1, 100, [1.0, 2.0, 3.0])
    ema.save(tmp_path)
    other, _ = _ema_steps(0.1, 100, [])
    other.load(tmp_path, model)
    assert torch.equal(other.average["weight"], ema.average["weight"])
    other.copy_into(model)  # the average becomes the model's weights (what final_model saves)
    assert torch.equal(model.weight.detach(), ema.average["weight"])
    with pytest.raises(UsageError, match=r"cannot resume from .*: its weight average ema.safetensors cannot be read"):
        other.load(tmp_path / "missing", model)
    with pytest.raises(UsageError, match="does not hold this model's weights"):
        other.load(tmp_path, torch.nn.Linear(1, 1))  # a bias the average lacks


def test_the_weight_average_needs_whole_weights():
    from gpt2_dutch.core.errors import UsageError
    from gpt2_dutch.train.config import TrainConfig

    with pytest.raises(UsageError, match="--ema-horizon is not available with --fsdp"):
        TrainConfig(dataset_path="-", ema_horizon=0.05, fsdp=True)
    with pytest.raises(UsageError, match="--ema-horizon must be at least 0"):
        TrainConfig(dataset_path="-", ema_horizon=-1)
