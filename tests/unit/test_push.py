"""`gpt2-dutch push` and `train --push-to-hub`: what is uploaded where (a recording HfApi stands in for the Hub),
a card written when missing, bad input as one line (exit 2), the unreachable or switched-off Hub as one line
through the real huggingface_hub (exit 1 / 2), and a missing token stopping `train` before it starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import assert_one_line_error

from gpt2_dutch.core.options import load_config
from gpt2_dutch.push import PushConfig, files_to_upload
from gpt2_dutch.runs.card import write_card
from gpt2_dutch.train import TrainConfig

UPLOADED = ["README.md", "config.json", "generation_config.json", "loss.png", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"]


PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


class RepoUrl(str):
    """What create_repo returns: the URL, and the full id (a bare NAME gets the token owner's namespace)."""

    def __new__(cls, repo_id: str) -> RepoUrl:
        full = repo_id if "/" in repo_id else f"tester/{repo_id}"
        url = super().__new__(cls, f"https://huggingface.co/{full}")
        url.repo_id = full
        return url


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records calls and what upload_folder would send."""

    calls: list[tuple[str, dict]] = []
    fail_with: Exception | None = None

    def __init__(self, token: str | None = None, **kw):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kw):
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return RepoUrl(repo_id)

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        sent = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name in kw["allow_patterns"])
        readme = (folder / "README.md").read_text() if (folder / "README.md").is_file() else None
        self.calls.append(("upload_folder", {**kw, "sent": sent, "readme": readme}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc")


@pytest.fixture(autouse=True)
def _hub(monkeypatch, tmp_path):
    """A token in HF_TOKEN only (never the machine's own login), the Hub replaced by RecordingHub."""
    import huggingface_hub
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    RecordingHub.calls = []
    RecordingHub.fail_with = None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)


def calls(name: str) -> list[dict]:
    return [kw for n, kw in RecordingHub.calls if n == name]


@pytest.fixture
def run_dir(tmp_path, small_tokenizer) -> Path:
    """A run directory holding a final_model (a 1-layer GPT-2, no card yet), run_config.json, metrics and a plot."""
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    run = tmp_path / "runs" / "gpt2-dutch-tiny-20261126-120000"
    final = run / "final_model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=32)).save_pretrained(final)
    AutoTokenizer.from_pretrained(str(small_tokenizer)).save_pretrained(final)
    GenerationConfig(max_new_tokens=10).save_pretrained(final)
    (run / "run_config.json").write_text(json.dumps({"format": "gpt2-dutch/run", "model_size": "tiny",
                                                     "license": "cc-by-4.0", "parameters": 22_000}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval_loss": 4.5, "eval_ppl": 90.0, "eval_bpb": 4.2,
                                                   "tokens": 640}) + "\n")
    (run / "loss.png").write_bytes(PNG)
    return run


@pytest.fixture
def final(run_dir) -> Path:
    """The final_model with its card, as train leaves it."""
    write_card(run_dir / "final_model", run_dir)
    return run_dir / "final_model"


@pytest.mark.parametrize("private", [False, True], ids=["public", "private"])
def test_push_uploads_the_model_card_and_curve_and_nothing_else(final, cli, private):
    (final / "notes.txt").write_text("my notes")  # a stray file is never sent
    rc, out, err = cli("push", "--model-path", final, "--repo-id", "someone/gpt2-dutch-tiny",
                       *(["--private"] if private else []))
    assert rc == 0, err
    assert out.strip() == "https://huggingface.co/someone/gpt2-dutch-tiny"
    assert calls("init") == [{"token": "hf_test_token"}]
    assert calls("create_repo") == [{"repo_id": "someone/gpt2-dutch-tiny", "private": private, "repo_type": "model",
                                     "exist_ok": True}]
    [upload] = calls("upload_folder")
    assert upload["repo_id"] == "someone/gpt2-dutch-tiny" and upload["repo_type"] == "model"
    assert Path(upload["folder_path"]) == final.resolve()
    assert sorted(upload["allow_patterns"]) == UPLOADED and upload["sent"] == UPLOADED
    assert "pushing 7 files" in err
    # the card's load snippet names the repository it went to, here and in what was sent
    assert 'model_id = "someone/gpt2-dutch-tiny"' in upload["readme"] == (final / "README.md").read_text()
    assert "path/to/final_model" not in upload["readme"]


def test_a_bare_name_goes_to_the_tokens_account_and_a_run_dir_or_link_is_accepted(final, cli, tmp_path):
    latest = final.parent.parent / "gpt2-dutch-tiny-latest"
    latest.symlink_to(final.parent.name)
    for path in (final.parent, latest):
        RecordingHub.calls = []
        rc, out, err = cli("push", "--model-path", path, "--repo-id", "gpt2-dutch-tiny")
        assert rc == 0, err
        assert calls("create_repo")[0]["repo_id"] == "gpt2-dutch-tiny"
        assert calls("upload_folder")[0]["repo_id"] == "tester/gpt2-dutch-tiny"  # the id create_repo resolved
        assert 'model_id = "tester/gpt2-dutch-tiny"' in calls("upload_folder")[0]["readme"]
        assert Path(calls("upload_folder")[0]["folder_path"]) == final.resolve()


def test_a_missing_card_is_written_from_the_run_first(run_dir, cli):
    final = run_dir / "final_model"
    assert not (final / "README.md").exists()
    rc, _, err = cli("push", "--model-path", final, "--repo-id", "someone/m")
    assert rc == 0, err
    card = (final / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0" and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 4.5
    assert (final / "loss.png").read_bytes() == PNG
    assert calls("upload_folder")[0]["sent"] == UPLOADED
    assert f"wrote the model card {final / 'README.md'}" in err


def test_files_to_upload_takes_sharded_weights_and_older_tokenizer_files(tmp_path):
    for name in ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "vocab.json", "merges.txt", "special_tokens_map.json", "README.md",
                 "training_args.txt", "optimizer.pt.txt"]:
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    assert files_to_upload(tmp_path) == ["README.md", "config.json", "merges.txt", "model-00001-of-00002.safetensors",
                                         "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                         "special_tokens_map.json", "vocab.json"]


def _bad_models(root: Path, run_dir: Path) -> None:
    import shutil

    final = run_dir / "final_model"
    (root / "empty").mkdir()
    for name, remove, add in [("pickled", [], {"pytorch_model.bin": b"pickle"}),
                              ("pickled-pt", [], {"extra.pt": b"pickle"}),
                              ("no-weights", ["model.safetensors"], {}),
                              ("no-tokenizer", ["tokenizer.json"], {}),
                              ("no-card", [], {})]:
        shutil.copytree(final, root / name)  # away from the run: no run_config.json beside it
        for f in [*remove, "README.md"]:
            (root / name / f).unlink(missing_ok=True)
        for f, data in add.items():
            (root / name / f).write_bytes(data)
        if name != "no-card":
            write_card(root / name, run_dir)


BAD_PUSHES = [  # "{tmp}": a directory of bad models, "{final}": a good final_model
    pytest.param(["--model-path", "{tmp}/nope", "--repo-id", "a/b"], "--model-path {tmp}/nope does not exist",
                 id="missing-path"),
    pytest.param(["--model-path", "{tmp}/empty", "--repo-id", "a/b"], "is not a model directory (no config.json)",
                 id="not-a-model-dir"),
    pytest.param(["--model-path", "{tmp}/pickled", "--repo-id", "a/b"],
                 "holds pickled files (pytorch_model.bin), which are never published", id="pickle-weights"),
    pytest.param(["--model-path", "{tmp}/pickled-pt", "--repo-id", "a/b"], "holds pickled files (extra.pt)",
                 id="pickle-pt"),
    pytest.param(["--model-path", "{tmp}/no-weights", "--repo-id", "a/b"], "has no safetensors weights",
                 id="no-safetensors"),
    pytest.param(["--model-path", "{tmp}/no-tokenizer", "--repo-id", "a/b"], "has no tokenizer", id="no-tokenizer"),
    pytest.param(["--model-path", "{tmp}/no-card", "--repo-id", "a/b"],
                 "has no model card (README.md) and no run_config.json beside it", id="no-card-no-run"),
    pytest.param(["--repo-id", "a/b"], "--model-path is required", id="no-model-path"),
    pytest.param(["--model-path", "{final}"], "--repo-id is required", id="no-repo-id"),
    *[pytest.param(["--model-path", "{final}", f"--repo-id={bad}"], "is not a Hub repository id", id=f"repo-id-{i}")
      for i, bad in enumerate(["a b", "a/b/c", "-name", "name.", "a--b", "a..b", "x" * 97, "", "ow/né", "/name"])],
]


@pytest.mark.parametrize(("args", "message"), BAD_PUSHES)
def test_bad_input_is_one_line(args, message, tmp_path, run_dir, final, cli):
    bad = tmp_path / "bad"
    bad.mkdir()
    _bad_models(bad, run_dir)
    fill = {"{tmp}": str(bad), "{final}": str(final)}
    argv = [a.replace("{tmp}", fill["{tmp}"]).replace("{final}", fill["{final}"]) for a in args]
    rc, _, err = cli("push", *argv)
    assert_one_line_error(rc, err, message.replace("{tmp}", str(bad)))
    assert RecordingHub.calls == []  # refused before the Hub is contacted


def test_no_token_is_one_line_with_what_to_do(final, cli, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    rc, _, err = cli("push", "--model-path", final, "--repo-id", "someone/m")
    assert_one_line_error(rc, err, "no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    assert RecordingHub.calls == []


def _http_error(status: int):
    from huggingface_hub.errors import HfHubHTTPError

    return HfHubHTTPError(f"{status} Client Error: nope", response=SimpleNamespace(status_code=status, headers={},
                                                                                  request=None))


HUB_FAILURES = [
    pytest.param(lambda: _http_error(401), 2, "the Hub refused the token (401 Unauthorized)", id="401"),
    pytest.param(lambda: _http_error(403), 2, "the token may not write to someone/m (403 Forbidden)", id="403"),
    pytest.param(lambda: _http_error(409), 2, "the Hub refused the push to someone/m (409", id="409"),
    pytest.param(lambda: _http_error(503), 1, "the Hub failed (503", id="503"),
    pytest.param(lambda: ConnectionResetError(104, "Connection reset by peer"), 1, "cannot reach the Hub at",
                 id="connection-reset"),
]


@pytest.mark.parametrize(("error", "code", "message"), HUB_FAILURES)
def test_hub_failures_are_one_line(error, code, message, final, cli):
    RecordingHub.fail_with = error()
    rc, _, err = cli("push", "--model-path", final, "--repo-id", "someone/m")
    assert_one_line_error(rc, err, message, code=code)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connecting is refused at once


def _push_in_a_fresh_process(final: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The real huggingface_hub (no stand-in), in its own interpreter: its settings are read at import."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    return subprocess.run([sys.executable, "-m", "gpt2_dutch", "push", "--model-path", str(final), "--repo-id",
                           "someone/m"], capture_output=True, text=True, timeout=120,
                          env={**base, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "hf_not_a_real_token",
                               **env})


@pytest.mark.parametrize(("env", "code", "message"), [
    pytest.param({"HF_HUB_OFFLINE": "1"}, 2, "HF_HUB_OFFLINE is set: publishing needs the Hub", id="offline-mode"),
    pytest.param({"HF_ENDPOINT": "http://127.0.0.1:{port}"}, 1, "cannot reach the Hub at http://127.0.0.1:{port} (",
                 id="unreachable"),
])
def test_the_real_hub_client_offline_or_unreachable_is_one_line(env, code, message, final, tmp_path):
    port = str(_closed_port())
    done = _push_in_a_fresh_process(final, tmp_path, **{k: v.replace("{port}", port) for k, v in env.items()})
    assert_one_line_error(done.returncode, done.stderr, message.replace("{port}", port), code=code)
    assert "check the network and run the same command again" in done.stderr or code == 2


def test_push_help_imports_no_hub_client():
    code = ("import contextlib, io, sys\nfrom gpt2_dutch.__main__ import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['push', '--help'])\n"
            "print(sorted(m for m in ('huggingface_hub', 'torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_push_config_in_python():
    cfg = PushConfig(model_path="m", repo_id="org/name.v2_x-y", private=True)
    assert cfg.repo_id == "org/name.v2_x-y" and cfg.private


# ---------------------------------------------------------------------------------------- train --push-to-hub


def test_train_without_a_token_stops_before_training(tiny_dataset, tmp_path, cli, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    out = tmp_path / "runs"
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, "--output-dir", out, "--model-size", "tiny",
                     "--push-to-hub", "someone/m")
    assert_one_line_error(rc, err, "no Hugging Face token")
    assert not out.exists()  # not even a run directory


@pytest.mark.parametrize("bad", ["a b", "a/b/c", "--x"], ids=["space", "two-slashes", "dashes"])
def test_train_refuses_a_bad_hub_id_before_anything(bad, tiny_dataset, tmp_path, cli):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, "--output-dir", tmp_path / "runs",
                     f"--push-to-hub={bad}")
    assert_one_line_error(rc, err, "--push-to-hub")
    assert not (tmp_path / "runs").exists() and RecordingHub.calls == []


@pytest.mark.slow
def test_train_pushes_the_final_model_after_the_run(tiny_dataset, tmp_path, cli):
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, "--output-dir", tmp_path, "--model-size", "tiny",
                     "--batch-size", "4", "--max-steps", "2", "--precision", "fp32", "--push-to-hub",
                     "someone/gpt2-dutch-tiny", "--private")
    assert rc == 0, err
    run = (tmp_path / "gpt2-dutch-tiny-latest").resolve()
    assert calls("create_repo") == [{"repo_id": "someone/gpt2-dutch-tiny", "private": True, "repo_type": "model",
                                     "exist_ok": True}]
    [upload] = calls("upload_folder")
    assert Path(upload["folder_path"]) == run / "final_model" and upload["sent"] == UPLOADED
    card = (run / "final_model" / "README.md").read_text()
    assert 'model_id = "someone/gpt2-dutch-tiny"' in card  # the card names where it was published
    assert "pushed to https://huggingface.co/someone/gpt2-dutch-tiny" in err
    # a replay of the run is a new run: it does not publish over this one
    assert load_config(TrainConfig, run / "run_config.json").push_to_hub is None


@pytest.mark.slow
def test_a_push_that_fails_after_training_keeps_the_run_and_says_how_to_push(tiny_dataset, tmp_path, cli):
    RecordingHub.fail_with = ConnectionRefusedError(111, "Connection refused")
    rc, _, err = cli("train", "--dataset-path", tiny_dataset, "--output-dir", tmp_path, "--model-size", "tiny",
                     "--batch-size", "4", "--max-steps", "1", "--precision", "fp32", "--push-to-hub", "someone/m")
    run = (tmp_path / "gpt2-dutch-tiny-latest").resolve()
    assert_one_line_error(rc, err, f"the run is finished and kept: push it with `gpt2-dutch push --model-path "
                                   f"{run / 'final_model'} --repo-id someone/m`", code=1)
    assert json.loads((run / "run_config.json").read_text())["status"] == "finished"
    assert (run / "final_model" / "README.md").is_file()
