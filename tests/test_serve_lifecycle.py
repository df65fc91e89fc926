"""`moetune serve` lifecycle on its own server process: the bearer key (--api-key-env), SIGTERM draining every
in-flight request (queued ones too) before a clean exit, and the command's argument errors."""
from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
import torch

from conftest import cli
from serve_helpers import Server, http, long_context_copy, metric, train_runs

torch.set_num_threads(1)
KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def run(tiny_llama, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-life")
    return train_runs(long_context_copy(tiny_llama, root / "base-model"), tiny_data, root, ["lora"])["lora"]


def test_api_key_then_sigterm_drains_in_flight_requests_and_exits_cleanly(run, tiny_data):
    server = Server([run, "--max-batch", "1", "--api-key-env", "MOETUNE_TEST_KEY"], env={"MOETUNE_TEST_KEY": KEY})
    try:
        url = server.url
        body = {"model": "base", "messages": [{"role": "user", "content": "Shout red"}], "max_tokens": 8}
        status, err = http(url + "/v1/chat/completions", "POST", body)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert http(url + "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert http(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        assert http(url + "/health")[0] == 200 and http(url + "/metrics")[0] == 200     # probes need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        prompts = [json.loads(x)["instruction"] for x in tiny_data["test"].read_text().splitlines()][:4]
        ask = lambda p: client.chat.completions.create(model="base", messages=[{"role": "user", "content": p}],  # noqa: E731
                                                       temperature=0, max_tokens=250)
        want = [ask(p).choices[0].message.content for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask, p) for p in prompts]               # one decodes, three wait (--max-batch 1)
            deadline = time.time() + 30
            while time.time() < deadline and metric(url, "moetune_active_sequences") < 1:
                time.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            u = urlparse(url)
            with pytest.raises(OSError):                                   # no new connections while draining
                socket.create_connection((u.hostname, u.port), timeout=2).close()
            draining = sum(not f.done() for f in futures)
            answers = [f.result(timeout=120) for f in futures]
        assert draining >= 1                                               # the refusal came during the drain
        assert [a.choices[0].message.content for a in answers] == want     # every in-flight request finished whole
        assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_serve_argument_errors_exit_2_with_one_paragraph(run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MOETUNE_UNSET_KEY", raising=False)
    assert cli(monkeypatch, "serve", run, "--api-key-env", "MOETUNE_UNSET_KEY") == 2
    assert "MOETUNE_UNSET_KEY is not set" in " ".join(capsys.readouterr().err.split())
    assert cli(monkeypatch, "serve", tmp_path / "missing") == 2
    assert "is not a directory" in capsys.readouterr().err
    twin = tmp_path / "a" / run.name
    twin.parent.mkdir()
    import shutil
    shutil.copytree(run, twin)
    assert cli(monkeypatch, "serve", run, twin) == 2
    assert "directory name of two RUNs" in " ".join(capsys.readouterr().err.split())
    assert cli(monkeypatch, "serve", run, "--max-batch", "0") == 2
