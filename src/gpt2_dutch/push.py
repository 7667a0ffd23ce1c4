"""Publish a trained model on the Hugging Face Hub: safetensors weights, tokenizer, model card and loss curve.

    hf auth login                         # once, with a token that may write (or set HF_TOKEN)
    gpt2-dutch push --model-path trained_models/gpt2-dutch-small-latest --repo-id gpt2-dutch-small
    gpt2-dutch push --model-path trained_models/gpt2-dutch-small-latest --repo-id my-org/gpt2-dutch-small --private
    gpt2-dutch train ... --push-to-hub gpt2-dutch-small      # the same at the end of a successful run

The repository is created when it does not exist (as private with --private; an existing repository keeps
its visibility) and one commit uploads the model directory's config, weights (safetensors only: a directory
holding pickled weights is refused), tokenizer files, README.md (the model card `train` writes; written first
when missing and the run's records are beside the model) and loss.png. Nothing else in the directory is sent.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_dutch.core.errors import UsageError, check, first_line, held_output
from gpt2_dutch.core.options import option
from gpt2_dutch.data.tokenizer import BadTokenizer, read_tokenizer_dir

# What a model repository needs, and only that: a stray file in final_model (a note, a pickle) is never sent.
UPLOADED = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
            "README.md", "loss.png"]
PICKLES = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]
# The Hub's rule (huggingface_hub.utils.validate_repo_id): NAME or OWNER/NAME, letters, digits, - _ ., each part
# at most 96 characters, no -- or .., not starting or ending with - or .
_PART = r"(?!.*--)(?!.*\.\.)[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?:{_PART}/)?{_PART}")
LOGIN_ADVICE = ("run `hf auth login` or set HF_TOKEN to a token with write access "
                "(https://huggingface.co/settings/tokens)")


class NetworkError(UsageError):
    """The Hub could not be reached or failed: one line, exit status 1 (the same command may work later)."""

    exit_code = 1


def check_repo_id(repo_id: str | None, flag: str) -> None:
    """A Hub model repository id, NAME or OWNER/NAME; one line (exit 2) otherwise."""
    check(repo_id is not None and REPO_ID.fullmatch(repo_id) is not None,
          f"{flag} {repo_id!r} is not a Hub repository id: give NAME or OWNER/NAME (letters, digits, '-', '_', '.'; "
          "at most 96 characters each, not starting or ending with '-' or '.')")


@dataclass
class PushConfig:
    model_path: str | None = option(None, "the model to publish: a final_model, run directory or -latest link")
    repo_id: str | None = option(None, "the Hub repository: NAME (under your account) or OWNER/NAME")
    private: bool = option(False, "create the repository as private (an existing one keeps its visibility)")
    commit_message: str = option("Upload a Dutch GPT-2 trained with gpt2-dutch", "the commit's message")

    def __post_init__(self) -> None:
        check(bool(self.model_path), "--model-path is required (a final_model, run directory or -latest link)")
        check(self.repo_id is not None, "--repo-id is required: the Hub repository, NAME or OWNER/NAME")
        check_repo_id(self.repo_id, "--repo-id")


def push(cfg: PushConfig) -> str:
    """Upload the model; return the repository's URL."""
    assert cfg.model_path is not None and cfg.repo_id is not None
    hub_token()  # before publishable_dir's notice of a card it wrote: a missing login is then the only line
    model_dir = publishable_dir(cfg.model_path)
    url = push_model(model_dir, cfg.repo_id, cfg.private, cfg.commit_message)
    print(url)
    return url


def publishable_dir(path: str | Path) -> Path:
    """The model directory behind `path`, checked for publishing: a config, safetensors weights, a tokenizer,
    no pickles, a card (written from the run's records when missing)."""
    from gpt2_dutch.runs.card import CARD, write_card
    from gpt2_dutch.runs.records import locate

    p = Path(path).expanduser()
    check(p.exists(), f"--model-path {p} does not exist; pass a final_model, run directory or -latest link")
    model_dir, run_dir = locate(p)
    check(model_dir.is_dir() and (model_dir / "config.json").is_file(),
          f"{model_dir} is not a model directory (no config.json); pass a final_model or run directory")
    pickles = sorted(f.name for pattern in PICKLES for f in model_dir.glob(pattern))
    check(not pickles, f"{model_dir} holds pickled files ({', '.join(pickles)}), which are never published: "
          "delete them (the weights belong in model.safetensors)")
    check(any(model_dir.glob("*.safetensors")), f"{model_dir} has no safetensors weights; save the model with "
          "save_pretrained (safetensors)")
    check((model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.json").is_file(),
          f"{model_dir} has no tokenizer (tokenizer.json); save the tokenizer beside the model")
    try:
        read_tokenizer_dir(model_dir)  # what would be published must read back: regular files, bounded, valid JSON
    except BadTokenizer as e:
        raise UsageError(f"{model_dir}: its tokenizer is damaged ({e.cause}); save the tokenizer beside the model "
                         "again") from None
    if not (model_dir / CARD).is_file():
        check(run_dir is not None, f"{model_dir} has no model card ({CARD}) and no run_config.json beside it to "
              f"write one from; add a {CARD} (see the model card in the gpt2-dutch README)")
        write_card(model_dir, run_dir)
        print(f"wrote the model card {model_dir / CARD}", file=sys.stderr)
    return model_dir


def files_to_upload(model_dir: Path) -> list[str]:
    """The names in `model_dir` that a push sends (see UPLOADED), sorted."""
    return sorted({f.name for pattern in UPLOADED for f in model_dir.glob(pattern) if f.is_file()})


def hub_token() -> str:
    """The token huggingface_hub would use (HF_TOKEN, then `hf auth login`'s file); one line (exit 2) when there
    is none or the Hub is switched off with HF_HUB_OFFLINE."""
    from huggingface_hub import constants, get_token

    check(not constants.HF_HUB_OFFLINE, "HF_HUB_OFFLINE is set: publishing needs the Hub; unset HF_HUB_OFFLINE "
          "(and make sure huggingface.co can be reached)")
    try:
        token = get_token()
    except Exception as e:  # noqa: BLE001 - an OIDC exchange (CI) that failed: its own message, one line
        raise UsageError(f"no Hugging Face token ({first_line(e)}); {LOGIN_ADVICE}") from None
    check(token is not None, f"no Hugging Face token: {LOGIN_ADVICE}")
    assert token is not None
    return token


def check_ready_to_push(repo_id: str) -> None:
    """What `train --push-to-hub` checks before training: a valid id and a token (a run of hours must not
    fail at its very end for a missing login). Whether the token may write is known only when it pushes."""
    check_repo_id(repo_id, "--push-to-hub")
    hub_token()


def push_model(model_dir: Path, repo_id: str, private: bool = False,
               commit_message: str = "Upload a Dutch GPT-2 trained with gpt2-dutch") -> str:
    """Create the repository if needed and upload the model's files in one commit; return its URL."""
    from huggingface_hub import HfApi

    from gpt2_dutch.runs.card import name_repo_in_card

    token = hub_token()
    files = files_to_upload(model_dir)
    size = sum((model_dir / f).stat().st_size for f in files)
    api = HfApi(token=token)
    with held_output():  # a refusal or an unreachable Hub is then the only line
        try:
            url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        except Exception as e:  # noqa: BLE001 - turned into one line below, or re-raised
            raise _hub_failure(e, repo_id) from None
    print(f"pushing {len(files)} files ({size / 1e6:.1f} MB) from {model_dir} to {repo_id} ...", file=sys.stderr)
    try:
        full_id = str(getattr(url, "repo_id", None) or repo_id)  # a bare NAME is under the token's account
        if "README.md" in files:
            name_repo_in_card(model_dir, full_id)  # the card's snippet then loads what was published
        api.upload_folder(repo_id=full_id, folder_path=str(model_dir), repo_type="model", allow_patterns=files,
                          commit_message=commit_message)
    except Exception as e:  # noqa: BLE001 - turned into one line below, or re-raised
        raise _hub_failure(e, repo_id) from None
    return str(url)


def push_after_training(run_dir: Path, repo_id: str, private: bool) -> str:
    """`train --push-to-hub`: push the run's final_model; if that fails the run stays finished and kept, and the
    one line says how to push it again."""
    model_dir = run_dir / "final_model"
    try:
        url = push_model(publishable_dir(model_dir), repo_id, private)
    except UsageError as e:
        again = f"; the run is finished and kept: push it with `gpt2-dutch push --model-path {model_dir} " \
                f"--repo-id {repo_id}{' --private' if private else ''}`"
        raise type(e)(f"{e}{again}") from None
    print(f"pushed to {url}", file=sys.stderr)
    return url


def _hub_failure(error: Exception, repo_id: str) -> Exception:
    """A Hub error as one line: the user's to fix (exit 2) or the network's (exit 1); anything else is a bug."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    if isinstance(error, HFValidationError):
        return UsageError(f"{repo_id!r} is not a valid Hub repository id ({first_line(error)})")
    if isinstance(error, OfflineModeIsEnabled):
        return UsageError("HF_HUB_OFFLINE is set: publishing needs the Hub; unset HF_HUB_OFFLINE")
    if isinstance(error, HfHubHTTPError):
        response: Any = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401:
            return UsageError(f"the Hub refused the token (401 Unauthorized): {LOGIN_ADVICE}")
        if status == 403:
            return UsageError(f"the token may not write to {repo_id} (403 Forbidden): use a token with write "
                              "access, or a repository under your own account or an organization you belong to")
        if status is not None and 400 <= status < 500:
            return UsageError(f"the Hub refused the push to {repo_id} ({status}: {first_line(error)})")
        return NetworkError(f"the Hub failed ({status or 'no answer'}: {first_line(error)}); run the same "
                            "command again later")
    # Connection refused, unknown host, timeouts: OSError for requests-based huggingface_hub releases, the
    # httpx family's TransportError for the newer ones (their class names are the stable part).
    network = {"TransportError", "RequestError", "NetworkError", "TimeoutException", "ConnectionError"}
    if isinstance(error, OSError) or network & {c.__name__ for c in type(error).__mro__}:
        return NetworkError(f"cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: "
                            f"{first_line(error)}); check the network and run the same command again")
    return error
