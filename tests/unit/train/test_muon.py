"""--optimizer muon: Muon's update in nn.Linear orientation (Conv1D transposed), c_attn as Q, K and V, which
parameters go where, training and exact resume with it, the CLI's errors and the FSDP fallback."""

from __future__ import annotations

import io
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_one_line_error, metrics, poison_training_step
from safetensors.torch import load_file

from gpt2_dutch.train import TrainConfig, train
from gpt2_dutch.train.muon import (
    MUON_LR,
    MuonAdamW,
    muon_momentum,
    newton_schulz,
    param_groups,
    resolve_optimizer,
)

BAND = (0.6, 1.3)  # the quintic's 5 steps leave singular values in ~[0.7, 1.2], not exactly 1


@pytest.fixture(autouse=True)
def _one_thread():
    """These matrices are tiny: one thread, as a thread pool's wake-ups cost more than the matmuls (and on a
    shared, busy CPU far more: a 128x128 matmul took 30 ms with 2 threads instead of 0.1 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(dataset_path=str(dataset), model_size="tiny", batch_size=4, precision="fp32", output_dir=str(out),
                optimizer="muon")
    base.update(kw)
    return TrainConfig(**base)


def conditioned(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A random matrix whose singular values are spread over [1, 3]: a gradient Newton-Schulz can orthogonalize
    in 5 steps (a Gaussian matrix has singular values near 0 that no 5-step iteration lifts to ~1)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g))
    k = min(rows, cols)
    return u[:, :k] @ torch.diag(torch.linspace(1, 3, k)) @ v[:, :k].T


def in_band(m: torch.Tensor) -> bool:
    s = torch.linalg.svdvals(m)
    return bool(((s > BAND[0]) & (s < BAND[1])).all())


def one_step(weight: torch.nn.Parameter, grad: torch.Tensor, blocks: int, lr: float = 0.01, **group) -> torch.Tensor:
    """The change that one Muon step (no weight decay) makes to a Conv1D weight, divided by the lr."""
    before = weight.detach().clone()
    opt = MuonAdamW([{"use_muon": True, "params": [weight], "lr": lr, "momentum": 0.95, "nesterov": True,
                      "layout": "conv1d", "blocks": blocks, "weight_decay": 0.0, **group}])
    weight.grad = grad
    opt.step()
    return (weight.detach() - before) / -lr


def test_a_conv1d_weight_is_updated_by_its_orthogonalized_momentum_in_linear_orientation():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(96, 32)  # 32 inputs, 96 outputs: stored 32x96, as nn.Linear 96x32
    assert layer.weight.shape == (32, 96)
    grad = conditioned(32, 96, seed=0)
    update = one_step(layer.weight, grad, blocks=1)
    # orthogonalized as the 96x32 Linear weight, transposed back, and scaled by sqrt(max(1, out/in)) = sqrt(3):
    # read as stored (32x96) the scale would be 1
    assert torch.allclose(update, 3**0.5 * newton_schulz(grad.T).T, atol=1e-5)
    assert in_band(update.T / 3**0.5)


def test_c_attn_is_orthogonalized_as_three_matrices():
    from transformers.pytorch_utils import Conv1D

    d = 32
    layer = Conv1D(3 * d, d)  # c_attn: Q, K and V side by side, the column blocks of the stored d x 3d weight
    # Q's gradient dwarfs V's: orthogonalized whole, V's block would be left ~0
    grad = torch.cat([scale * conditioned(d, d, seed=i) for i, scale in enumerate((100.0, 1.0, 0.01))], dim=1)
    update = one_step(layer.weight, grad, blocks=3)
    for i in range(3):  # square blocks: the lr scale is 1
        assert in_band(update[:, i * d:(i + 1) * d]), i
    whole = newton_schulz(grad.T).T
    assert torch.linalg.svdvals(whole[:, 2 * d:]).max() < 0.1  # what one 3d x d matrix would have given V


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def test_hidden_matrices_go_to_muon_and_the_rest_to_adamw():
    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter, an embedding
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    muon = {names[id(p)]: g["blocks"] for g in groups if g["use_muon"] for p in g["params"]}
    adamw = {names[id(p)]: g["weight_decay"] for g in groups if not g["use_muon"] for p in g["params"]}
    assert muon == {f"transformer.h.{i}.{m}.weight": 3 if m == "attn.c_attn" else 1
                    for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(muon) | set(adamw) == set(names.values()) and not set(muon) & set(adamw)
    assert adamw["transformer.wte.weight"] == adamw["transformer.wpe.weight"] == 0.1  # embeddings decay
    assert all(wd == 0.0 for n, wd in adamw.items() if n.endswith(".bias") or ".ln_" in n)
    assert not groups[0]["use_muon"] and groups[0]["lr"] == 1e-3  # the first group's lr is the one logged
    # the schedule scales every group; a Muon matrix decays by AdamW's lr x wd per step
    opt = MuonAdamW(groups)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.5 * (MUON_LR if g["use_muon"] else 1e-3))
        if g["use_muon"]:
            assert g["lr"] * g["weight_decay"] == pytest.approx(0.5 * 1e-3 * 0.1)


def test_adamw_weight_decay_sets_the_embedding_and_head_decay_and_leaves_muons():
    model = _tiny_gpt2()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, adamw_weight_decay=0.0)
    adamw = {names[id(p)]: g["weight_decay"] for g in groups if not g["use_muon"] for p in g["params"]}
    assert adamw["transformer.wte.weight"] == adamw["transformer.wpe.weight"] == 0.0
    assert all(g["weight_decay"] * g["lr"] == pytest.approx(1e-3 * 0.1) for g in groups if g["use_muon"])
    opt = MuonAdamW(groups)
    wte = model.transformer.wte.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # a zero gradient: only decay could move a weight, and the tables have none
    assert torch.equal(model.transformer.wte.weight, wte)


@pytest.mark.parametrize("options", [{}, {"iteration": "polar-express", "normuon_beta2": 0.9,
                                          "cautious_weight_decay": True}], ids=["defaults", "options-on"])
def test_the_state_dict_restores_the_same_next_step(options):
    """What the Trainer's checkpoint relies on: state_dict -> load_state_dict -> the same update (with the
    options of issue #25 too: NorMuon's second moment is part of the state)."""
    def steps(model, opt, n):
        for i in range(n):
            torch.manual_seed(100 + i)
            ids = torch.randint(0, 64, (2, 16))
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()

    a = _tiny_gpt2()
    opt_a = MuonAdamW(param_groups(a, lr=1e-3, weight_decay=0.1, **options))
    steps(a, opt_a, 2)
    assert ("second_moment" in opt_a.state[a.transformer.h[0].mlp.c_fc.weight]) == ("normuon_beta2" in options)
    b = _tiny_gpt2()
    b.load_state_dict(a.state_dict())
    opt_b = MuonAdamW(param_groups(b, lr=1e-3, weight_decay=0.1, **options))
    saved = io.BytesIO()  # through a file, as optimizer.pt (a loaded state would share tensors otherwise)
    torch.save(opt_a.state_dict(), saved)
    saved.seek(0)
    opt_b.load_state_dict(torch.load(saved, weights_only=True))
    steps(a, opt_a, 2)
    steps(b, opt_b, 2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_under_fsdp_muon_falls_back_to_adamw_with_a_one_line_notice():
    used, notice = resolve_optimizer("muon", fsdp=True)
    assert used == "adamw" and notice is not None and "\n" not in notice
    assert "--fsdp" in notice and "AdamW" in notice
    assert resolve_optimizer("muon", fsdp=False) == ("muon", None)
    assert resolve_optimizer("adamw", fsdp=True) == ("adamw", None)


def test_an_unknown_optimizer_is_a_one_line_error(tiny_dataset, tmp_path, cli):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "1",
                     "--optimizer", "foo")
    assert_one_line_error(rc, err, "invalid choice: 'foo'")


@pytest.mark.slow
def test_muon_trains_the_tiny_model_and_the_health_guard_wraps_its_step(tiny_dataset, tmp_path, monkeypatch):
    poison_training_step(monkeypatch, 2)  # Muon would turn a NaN gradient into NaN weights: the guard skips it
    run = train(tiny_cfg(tiny_dataset, tmp_path, max_steps=30, eval_every=30, log_every=1))
    m = metrics(run)
    losses = [r["loss"] for r in m if r.get("loss") is not None]
    assert losses[0] > 5.0 and losses[-1] < losses[0] - 1.0, losses
    assert m[-1].get("skipped_steps") == 1 or any(r.get("skipped_steps") == 1 for r in m)
    evals = [r["eval_loss"] for r in m if "eval_loss" in r]
    assert evals and evals[-1] < 4.5
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["optimizer"] == "muon" and saved["muon_lr"] == MUON_LR
    assert (run / "final_model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_exact_resume_with_muon_and_a_changed_optimizer_is_refused(tiny_dataset, tmp_path, cli):
    """8 steps straight vs the same run cut after its step-4 checkpoint (as a kill leaves it) and resumed:
    the same weights, bit for bit (Muon's momentum and AdamW's moments come back from optimizer.pt)."""
    straight = train(tiny_cfg(tiny_dataset, tmp_path / "a", max_steps=8, save_every=4, eval_every=8,
                              keep_checkpoints=5))
    cut = tmp_path / "b" / straight.name
    shutil.copytree(straight, cut, symlinks=True)
    shutil.rmtree(cut / "final_model")
    shutil.rmtree(cut / "checkpoints" / "checkpoint-8")
    saved = json.loads((cut / "run_config.json").read_text())
    (cut / "run_config.json").write_text(json.dumps({**saved, "status": "running"}))

    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path / "b",
                     "--max-steps", "8", "--save-every", "4", "--resume", cut, "--optimizer", "adamw")
    assert_one_line_error(rc, err, "it was trained with --optimizer muon (pass --optimizer muon)")

    resumed = train(tiny_cfg(tiny_dataset, tmp_path / "b", max_steps=8, save_every=4, eval_every=8,
                             resume=str(cut / "checkpoints" / "checkpoint-4")))
    assert resumed == cut
    a = load_file(straight / "final_model" / "model.safetensors")
    b = load_file(cut / "final_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------ the options of issue #25 (off by default)


def test_muon_momentum_warmup_rises_from_085_to_095_then_stays():
    assert [muon_momentum(step, 300) for step in (0, 150, 299, 300, 5000)] == pytest.approx(
        [0.85, 0.90, 0.85 + 0.1 * 299 / 300, 0.95, 0.95])
    assert muon_momentum(0, 0) == 0.95  # off: the published momentum from the first step


def test_the_momentum_warmup_sets_muons_groups_before_each_step_from_the_step_and_the_runs_length():
    from types import SimpleNamespace

    from gpt2_dutch.train.plan import UNFITTED
    from gpt2_dutch.train.schedule import make_schedule
    from gpt2_dutch.train.trainer import MuonMomentumWarmup

    groups = [{"use_muon": True, "momentum": 0.95}, {"use_muon": False, "betas": (0.7, 0.99)}]
    optimizer = SimpleNamespace(param_groups=groups)
    schedule = make_schedule("wsd", total_steps=200, warmup_steps=10, cooldown=0.2)

    def momentum_at(step: int, warmup: float) -> float:
        MuonMomentumWarmup(warmup, schedule).on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None,
                                                                   optimizer=optimizer)
        return groups[0]["momentum"]

    assert momentum_at(0, 20) == pytest.approx(0.85) and momentum_at(10, 20) == pytest.approx(0.90)
    assert momentum_at(10, 0.1) == pytest.approx(0.90)  # a fraction: of the 200-step run
    schedule.total_steps = 400  # a --max-time refit: the fraction follows the length
    assert momentum_at(10, 0.1) == pytest.approx(0.875)
    schedule.total_steps = UNFITTED  # before the fit: as a 100-step run, as the learning rate's warmup
    assert momentum_at(5, 0.1) == pytest.approx(0.90) and momentum_at(10, 0.1) == pytest.approx(0.95)
    assert groups[1] == {"use_muon": False, "betas": (0.7, 0.99)}  # AdamW's groups are left alone


def test_the_muon_options_need_muon_and_are_off_under_fsdp(tiny_dataset, tmp_path, cli):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "1",
                     "--optimizer", "adamw", "--muon-momentum-warmup", "300")
    assert_one_line_error(rc, err, "--muon-momentum-warmup is for --optimizer muon")
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path, "--max-steps", "1",
                     "--muon-momentum-warmup", "-1")
    assert_one_line_error(rc, err, "--muon-momentum-warmup must be at least 0")
    from gpt2_dutch.train.plan import make_plan

    manifest = {"chunk_size": 32, "vocab_size": 300,
                "splits": {"train": {"chunks": 400}, "test": {"chunks": 20, "bytes": 2600, "tokens": 640}}}
    from gpt2_dutch.train.config import MUON_OPTIONS

    muon_options = {k: v for k, v in OPTIONS_ON.items() if k in MUON_OPTIONS}
    plan = make_plan(tiny_cfg(tmp_path, tmp_path, model_size="pico", max_steps=5, fsdp=True, **muon_options),
                     manifest, 400, eos_token_id=0)
    # --fsdp trains with AdamW: the record says the Muon options were off, as they were
    assert plan.optimizer == plan.cfg.optimizer == "adamw"
    assert muon_options and all(getattr(plan.cfg, k) == getattr(TrainConfig(dataset_path="-"), k)
                                for k in muon_options)


def test_polar_express_ends_closer_to_orthogonal_than_the_quintic_in_the_same_five_steps():
    from transformers.pytorch_utils import Conv1D

    for rows, cols in ((64, 64), (32, 96)):
        g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        orthogonal = u @ vh
        quintic, polar = newton_schulz(g), newton_schulz(g, iteration="polar-express")
        s = torch.linalg.svdvals(polar)
        assert bool(((s > 0.8) & (s < 1.2)).all()), s
        distances = [float((m - orthogonal).norm() / orthogonal.norm()) for m in (polar, quintic)]
        assert distances[0] < 0.12 < 0.18 < distances[1], distances  # measured: ~0.09 against ~0.21
    layer = Conv1D(96, 32)  # a param group's "iteration" reaches the update (in nn.Linear orientation)
    grad = conditioned(32, 96, seed=0)
    update = one_step(layer.weight, grad, blocks=1, iteration="polar-express")
    assert torch.allclose(update, 3**0.5 * newton_schulz(grad.T, iteration="polar-express").T, atol=1e-5)


def test_normuon_evens_out_the_neurons_steps_and_keeps_the_matrixs_step_size():
    from transformers.pytorch_utils import Conv1D

    from gpt2_dutch.train.muon import normalize_neurons, normuon_shape

    q, _ = torch.linalg.qr(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)))
    scales = torch.linspace(0.2, 3.0, 64)[:, None]  # a tall update whose rows (neurons) differ 15x in size
    update = (scales * q)[None]
    second_moment = torch.zeros(1, 64, 1)
    out = normalize_neurons(update, second_moment, beta2=0.9)
    rms = out.square().mean(dim=-1).sqrt()
    assert torch.allclose(rms, rms.mean().expand_as(rms), rtol=1e-4)  # every neuron the same step
    assert torch.allclose(out.norm(), update.norm(), rtol=1e-5)  # the matrix's step keeps its size
    assert torch.allclose(second_moment, 0.1 * update.square().mean(dim=-1, keepdim=True))
    # one value per row of a tall block, per column of a wide one (nn.Linear orientation: Conv1D is stored in x out)
    assert normuon_shape(Conv1D(128, 32).weight, True, 1) == (1, 128, 1)  # c_fc: 128 out x 32 in
    assert normuon_shape(Conv1D(32, 128).weight, True, 1) == (1, 1, 128)  # c_proj: 32 out x 128 in
    assert normuon_shape(Conv1D(96, 32).weight, True, 3) == (3, 32, 1)  # c_attn: Q, K and V, 32 x 32 each
    assert normuon_shape(torch.nn.Linear(32, 128).weight, False, 1) == (1, 128, 1)


def test_cautious_weight_decay_decays_only_where_the_update_shrinks_the_weight():
    from gpt2_dutch.train.muon import orthogonal_update

    def step(cautious: bool) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.nn.Parameter(torch.randn(24, 24, generator=torch.Generator().manual_seed(1)))
        before = weight.detach().clone()
        weight.grad = conditioned(24, 24, seed=2)
        MuonAdamW([{"use_muon": True, "params": [weight], "lr": 0.1, "momentum": 0.95, "nesterov": True,
                    "layout": "linear", "blocks": 1, "weight_decay": 0.5,
                    "cautious_weight_decay": cautious}]).step()
        return before, weight.detach()

    before, plain = step(False)
    _, cautious = step(True)
    # the first update is the orthogonalized gradient (Nesterov momentum from zero: a multiple of it)
    update = orthogonal_update(conditioned(24, 24, seed=2), False, 1)
    shrinks = update * before >= 0
    assert 0.3 < shrinks.float().mean() < 0.7  # both kinds of coordinate are there
    assert torch.allclose(plain, before * (1 - 0.05) - 0.1 * update, atol=1e-6)
    assert torch.allclose(cautious, torch.where(shrinks, before * (1 - 0.05), before) - 0.1 * update, atol=1e-6)


# Every option of issue #25 at once: each one's state comes back from the checkpoint (or is a function of the step)
OPTIONS_ON = dict(muon_momentum_warmup=8, muon_iteration="polar-express", normuon=True,
                  cautious_weight_decay=True, ema_horizon=0.25)


@pytest.mark.slow
def test_exact_resume_with_the_optimizer_options_on_and_a_changed_option_is_refused(tiny_dataset, tmp_path, cli):
    """As the exact resume test above, with every option on: the same weights bit for bit; each option is in
    run_config.json, and a resume that asks for another value of one is refused in one line."""
    straight = train(tiny_cfg(tiny_dataset, tmp_path / "a", max_steps=8, save_every=4, eval_every=8,
                              keep_checkpoints=5, **OPTIONS_ON))
    saved = json.loads((straight / "run_config.json").read_text())
    assert {k: saved[k] for k in OPTIONS_ON} == OPTIONS_ON
    state = torch.load(straight / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    # the momentum of step 4 (index 3) of an 8-step warmup, as the optimizer used it
    muon = [g for g in state["param_groups"] if g["use_muon"]]
    assert muon and [g["momentum"] for g in muon] == pytest.approx([0.85 + 0.1 * 3 / 8] * len(muon))
    assert {g["iteration"] for g in muon} == {"polar-express"} and {g["normuon_beta2"] for g in muon} == {0.9}
    assert all("second_moment" in state["state"][i] for g in muon for i in g["params"])
    assert {g["cautious_weight_decay"] for g in muon} == {True}
    # --ema-horizon: final_model is the weight average kept in the last checkpoint, not the last step's weights,
    # a plain GPT2LMHeadModel; the run's last evaluation is the average's
    from transformers import AutoModelForCausalLM

    assert (straight / "checkpoints" / "checkpoint-4" / "ema.safetensors").is_file()
    final = load_file(straight / "final_model" / "model.safetensors")
    average = load_file(straight / "checkpoints" / "checkpoint-8" / "ema.safetensors")
    last = load_file(straight / "checkpoints" / "checkpoint-8" / "model.safetensors")
    assert all(torch.equal(final[k], average[k]) for k in average)
    assert not torch.equal(final["transformer.h.0.mlp.c_fc.weight"], last["transformer.h.0.mlp.c_fc.weight"])
    assert type(AutoModelForCausalLM.from_pretrained(straight / "final_model")).__name__ == "GPT2LMHeadModel"
    evals = [r for r in metrics(straight) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [8, 8] and evals[-1]["weights"] == "ema" and "weights" not in evals[0]
    cut = tmp_path / "b" / straight.name
    shutil.copytree(straight, cut, symlinks=True)
    shutil.rmtree(cut / "final_model")
    shutil.rmtree(cut / "checkpoints" / "checkpoint-8")
    (cut / "run_config.json").write_text(json.dumps({**saved, "status": "running"}))

    rc, _, err = cli("train", "--dataset-path", tiny_dataset, *TINY, "--output-dir", tmp_path / "b",
                     "--max-steps", "8", "--save-every", "4", "--resume", cut)
    assert_one_line_error(rc, err, "it was trained with --muon-momentum-warmup 8 (pass that)")

    resumed = train(tiny_cfg(tiny_dataset, tmp_path / "b", max_steps=8, save_every=4, eval_every=8,
                             resume=str(cut / "checkpoints" / "checkpoint-4"), **OPTIONS_ON))
    assert resumed == cut
    assert [r.get("weights") for r in metrics(cut) if "eval_loss" in r] == [None, "ema"]
    a = load_file(straight / "final_model" / "model.safetensors")
    b = load_file(cut / "final_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# Two gloo ranks with the same gradients, as DDP leaves them: Muon split across the ranks (each orthogonalizes
# every second matrix and broadcasts it) against the same optimizer unsplit on each rank; prints SAME or the
# first tensor that differs.
SPLIT_SCRIPT = textwrap.dedent("""
    import copy, sys
    import torch, torch.distributed as dist
    from gpt2_dutch.model.presets import gpt2_config
    from gpt2_dutch.train.muon import MuonAdamW, NORMUON_BETA2, param_groups
    from transformers import GPT2LMHeadModel

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same model and gradients on both ranks
    model = GPT2LMHeadModel(gpt2_config("pico", 64, 16, 0))
    models = {split: copy.deepcopy(model) for split in (False, True)}
    opts = {split: MuonAdamW(param_groups(m, 1e-3, 0.1, normuon_beta2=NORMUON_BETA2, cautious_weight_decay=True),
                             split_across_ranks=split) for split, m in models.items()}
    for step in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for split, m in models.items():
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opts[split].step()
    a, b = (dict(m.named_parameters()) for m in (models[False], models[True]))
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    moments = [(opts[False].state[p]["second_moment"], opts[True].state[q]["second_moment"])
               for p, q in zip(models[False].parameters(), models[True].parameters())
               if "second_moment" in opts[False].state[p]]
    bad += [f"second moment {i}" for i, (x, y) in enumerate(moments) if not torch.equal(x, y)]
    print(f"rank {dist.get_rank()}: " + ("SAME" if not bad and moments else f"DIFFERENT {bad[:3]}"))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_muon_split_across_two_ranks_gives_the_update_of_one(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "split.py"
    script.write_text(SPLIT_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(line for line in r.stdout.splitlines() if line.startswith("rank")) == ["rank 0: SAME",
                                                                                        "rank 1: SAME"]
