"""Output a person reads: a hub id with no network fails in seconds (one short probe, against local fakes of the
hub), and third-party logs and bars stay quiet unless --debug."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_hub_is_one_clear_error(online, monkeypatch: pytest.MonkeyPatch):
    from bittune.errors import ModelLoadError
    from bittune.hub import require_reachable

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ModelLoadError, match=r"cannot reach the Hugging Face Hub .* to fetch 'owner/model'"):
        require_reachable("owner/model", timeout=2)


def test_a_hub_that_never_answers_times_out(online, monkeypatch: pytest.MonkeyPatch):
    from bittune.errors import ModelLoadError
    from bittune.hub import require_reachable

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection, never answers
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(ModelLoadError, match="timed out"):
            require_reachable("owner/model", timeout=0.5)
    finally:
        silent.close()


def test_any_http_answer_means_reachable(online, monkeypatch: pytest.MonkeyPatch):
    from bittune.hub import require_reachable

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        require_reachable("owner/model", timeout=5)  # the loaders then say what is wrong with the id
    finally:
        thread.join(5)
        server.server_close()


def test_offline_mode_skips_the_probe(monkeypatch: pytest.MonkeyPatch):
    from bittune.hub import require_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    require_reachable("owner/model", timeout=0.1)


def test_eval_of_an_unreachable_hub_id_fails_before_loading(online, monkeypatch, tmp_path, capsys):
    from bittune.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "owner/model", "--data", str(data), "--format", "text"])
    assert exc.value.code == 2 and "cannot reach the Hugging Face Hub" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "validate", "plan", "generate", "export", "quantize"])
def test_every_command_on_an_unreachable_hub_id_fails_in_seconds(command, online, monkeypatch, tmp_path, capsys):
    """Not only eval: whatever loads the model (training's preflight, export, quantize, generate, the plan's
    config.json) probes the hub once instead of waiting through the loaders' retries."""
    import time

    import yaml

    from tiny import color_chat_rows, run_cli, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", color_chat_rows(4))
    cfg = tmp_path / "cfg.yaml"
    raw = {"model": {"path": "owner/model"}, "method": "lora", "data": {"train": str(data), "format": "chat"},
           "output_dir": str(tmp_path / "run")}  # fmt: skip
    cfg.write_text(yaml.safe_dump(raw))
    argv = {
        "train": ["train", str(cfg)],
        "validate": ["validate", str(cfg)],
        "plan": ["plan", str(cfg), "--device", "cpu"],
        "generate": ["generate", "owner/model", "--prompt", "hi"],
        "export": ["export", "owner/model", "--out", str(tmp_path / "m.gguf")],
        "quantize": ["quantize", "owner/model", "--out", str(tmp_path / "q"), "--bits", "4", "--method", "int"],
    }[command]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.perf_counter()
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "cannot reach the Hugging Face Hub" in err and "Traceback" not in err, err
    assert time.perf_counter() - t0 < 30  # one probe, not the loaders' minute of retries
    assert not (tmp_path / "run").exists() and not (tmp_path / "q").exists() and not (tmp_path / "m.gguf").exists()


def test_third_party_output_is_quiet_unless_debug(tiny_llama_dir, tmp_path):
    """What a person reads: bittune's own lines; transformers' bars only with --debug."""
    import os
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the apple is red"}\n' * 3)
    args = ["eval", str(tiny_llama_dir), "--data", str(data), "--format", "text", "--device", "cpu"]

    from bittune.quiet import QUIET_ENV

    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}  # as a user's shell has it

    def stderr(*extra: str) -> str:
        cmd = [sys.executable, "-m", "bittune", *extra, *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stderr

    quiet = stderr()
    assert "Loading weights" not in quiet and "Warning" not in quiet and "loading ..." in quiet
    assert "Loading weights" in stderr("--debug")
