"""core/errors.held_output: what libraries print during a call that ends in a UsageError is dropped (the one line is
the only line); after any other ending it is printed, and their progress bars are switched back on."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import pytest

from gpt2_dutch.core.errors import UsageError, held_output


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _chatter() -> None:
    """A library's four ways to print: a log record, a warning, sys.stderr (tqdm), fd 2 (Rust, C)."""
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    warnings.warn("a load report", UserWarning, stacklevel=1)
    print("Loading weights: 100%", file=sys.stderr)
    os.write(2, b"native chatter\n")


@pytest.fixture
def recorder():
    rec = _Recorder()
    logger = logging.getLogger("huggingface_hub")
    logger.addHandler(rec)
    yield rec
    logger.removeHandler(rec)


@pytest.mark.parametrize(("ending", "shown"), [
    pytest.param(None, True, id="success"),
    pytest.param(UsageError("cannot load the tokenizer"), False, id="usage-error"),
    pytest.param(RuntimeError("a bug"), True, id="bug"),
    pytest.param(KeyboardInterrupt(), True, id="ctrl-c"),
])
def test_library_output_is_dropped_only_for_a_usage_error(ending, shown, capfd, recorder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with held_output():
                _chatter()
                assert capfd.readouterr().err == ""  # nothing gets through while the block runs
                if ending is not None:
                    raise ending
        except (UsageError, RuntimeError, KeyboardInterrupt) as e:
            assert e is ending
    err = capfd.readouterr().err
    assert ("Loading weights: 100%" in err and "native chatter" in err) is shown, err
    assert ("Loading weights" in err or "native chatter" in err) is shown, err
    assert recorder.messages == (["Retrying in 1s [Retry 1/5]."] if shown else [])
    assert [str(w.message) for w in caught] == (["a load report"] if shown else [])


def test_progress_bars_are_off_inside_and_back_on_after_and_it_nests():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils.logging import is_progress_bar_enabled

    assert is_progress_bar_enabled() and not are_progress_bars_disabled()
    with pytest.raises(UsageError), held_output():
        assert not is_progress_bar_enabled() and are_progress_bars_disabled()
        with held_output():
            assert not is_progress_bar_enabled()
        raise UsageError("x")
    assert is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert logging.getLogger("transformers").handlers  # the library's own handler is back
