"""serve/__init__.py: the serve command's flags as one line, loopback and the warning for other addresses."""

from __future__ import annotations

import socket
from pathlib import Path

from helpers import assert_one_line_error

from gpt2_dutch.serve import ServeConfig, is_loopback


def test_bad_serve_flags_are_one_line(cli, tmp_path: Path, served_run: Path):
    rc, _, err = cli("serve", "--port", "70000")
    assert_one_line_error(rc, err, "--port must be between 0 and 65535")
    rc, _, err = cli("serve", "--batch-size", "0")
    assert_one_line_error(rc, err, "--batch-size must be between 1")
    rc, _, err = cli("serve", "--model-path", str(tmp_path / "missing"), "--port", "0")
    assert_one_line_error(rc, err, "does not exist")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        rc, _, err = cli("serve", "--model-path", str(served_run), "--port", str(taken.getsockname()[1]))
    assert_one_line_error(rc, err, "cannot listen on 127.0.0.1")


def test_loopback_and_the_warning_for_other_addresses(served_run: Path, monkeypatch, capsys):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.10", "::", "example.org"))
    import uvicorn

    import gpt2_dutch.serve as serve_module

    # bound to loopback whatever --host says, and uvicorn not run: only what serve() says is checked
    monkeypatch.setattr(serve_module, "bind", lambda host, port: socket.create_server(("127.0.0.1", 0)))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    serve_module.serve(ServeConfig(model_path=str(served_run), host="0.0.0.0", device="cpu", precision="fp32"))
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0, not loopback" in err and "--api-key" in err
    serve_module.serve(ServeConfig(model_path=str(served_run), host="127.0.0.1", device="cpu", precision="fp32"))
    assert "warning" not in capsys.readouterr().err
