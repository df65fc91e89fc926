"""`moetune serve` end to end: one real server (a subprocess on a free localhost port) serving a trained tiny run of
every expert type on one shared base, talked to with the official `openai` client and with raw HTTP; then a second
server for the bearer key and SIGTERM draining (it is stopped by the test), and the command's argument errors."""
from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
import torch

from conftest import cli, write_jsonl
from serve_helpers import CONTEXT, TYPES, Server, http, long_context_copy, metric, train_runs

torch.set_num_threads(1)
LIMIT = 300
KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def runs(tiny_llama, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runs")
    base = long_context_copy(tiny_llama, root / "base-model")
    return train_runs(base, tiny_data, root)


@pytest.fixture(scope="module")
def server(runs):
    s = Server([*runs.values(), "--max-batch", "4", "--max-tokens-limit", LIMIT])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def prompts(tiny_data):
    return [json.loads(x)["instruction"] for x in tiny_data["test"].read_text().splitlines()]


def chat(client, model, prompt, stream=False, **kw):
    """(text, finish_reason, usage or None) of one chat request; streamed text is the concatenated deltas."""
    kw = {"temperature": 0, **kw}
    msgs = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=msgs, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish = "", None
    for chunk in client.chat.completions.create(model=model, messages=msgs, stream=True, **kw):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish, None


def generated(runs, name, prompts, tmp_path, monkeypatch, max_new: int) -> list[str]:
    """`moetune generate` (batches of 8, greedy) on the same prompts."""
    p = write_jsonl(tmp_path / f"{name}-{max_new}.jsonl", [{"prompt": x} for x in prompts])
    out = tmp_path / f"{name}-{max_new}.out.jsonl"
    assert cli(monkeypatch, "generate", runs[name], "--prompts", p, "--out", out, "--max-new-tokens", max_new,
               "--batch-size", "8") == 0
    return [json.loads(x)["output"] for x in out.read_text().splitlines()]


@pytest.mark.parametrize("name", list(TYPES))
def test_greedy_through_the_server_equals_generate_in_any_batch(name, runs, server, client, prompts, tmp_path,
                                                                   monkeypatch):
    """16 concurrent requests (max_tokens 3 or 7, half streamed) through batches of at most 4 rows that requests join
    and leave between decode steps, then the same requests one at a time: every greedy answer is `moetune generate`'s."""
    want = {k: generated(runs, name, prompts, tmp_path, monkeypatch, k) for k in (3, 7)}
    assert sum(bool(t) for t in want[7]) >= len(prompts) // 2      # real text, not empty answers
    jobs = [(p, 3 if i % 2 else 7, i % 4 == 0) for i, p in enumerate(prompts)]
    steps = metric(server.url, "moetune_batch_size_count", model=name)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda j: chat(client, name, j[0], j[2], max_tokens=j[1]), jobs))
    alone = [chat(client, name, p, s, max_tokens=k) for p, k, s in jobs[:6]]
    for i, ((p, k, _), (text, finish, use)) in enumerate(zip(jobs, together)):
        assert text.strip() == want[k][i], (name, p, k)
        assert finish in ("stop", "length")
        if use is not None:
            assert use.completion_tokens <= k and (finish == "stop" or use.completion_tokens == k)
    assert [t for t, _, _ in alone] == [t for t, _, _ in together[:6]]
    # the concurrent requests really were decoded together: decode steps with more than one row
    _, text = http(server.url + "/metrics")
    counts = {ln.split("{")[0] + ln.split('le="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1])
              for ln in text.splitlines() if ln.startswith("moetune_batch_size_bucket") and f'model="{name}"' in ln}
    assert metric(server.url, "moetune_batch_size_count", model=name) > steps
    assert counts["moetune_batch_size_bucket1"] < metric(server.url, "moetune_batch_size_count", model=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: the engine's GPU path (runs on a CUDA machine)"))])
def test_engine_in_process_matches_generate_on_each_device(device, runs, prompts):
    """The engine without HTTP, on `device`: 8 greedy requests per type, batches of at most 3 rows that requests
    join and leave (max_tokens 2 to 9); each text is `generate_batch`'s for that prompt alone on the same device."""
    from moetune.eval.generation import Sampling, generate_batch
    from moetune.serve.engine import Engine, Job
    from moetune.serve.protocol import Parsed
    from moetune.serve.loading import load_served
    from moetune.serve.metrics import Metrics
    served = load_served(list(runs.values()), device=device, log=lambda m: None)
    engine = Engine(served, 3, Metrics())
    engine.start()
    try:
        for name in TYPES:
            s, done, jobs = served[name], {}, []
            finished = threading.Semaphore(0)
            for i, p in enumerate(prompts[:8]):
                def emit(kind, data, i=i):
                    if kind in ("done", "error"):
                        done[i] = (kind, data)
                        finished.release()
                jobs.append(Job(Parsed(name, s.encoder.prompt_ids([{"role": "user", "content": p}]), 2 + i, 0.0), emit))
            for job in jobs:
                engine.submit(job)
            for _ in jobs:
                assert finished.acquire(timeout=120)
            for i, job in enumerate(jobs):
                want = generate_batch(s.model, s.tokenizer, [job.req.prompt], Sampling(max_new_tokens=2 + i), device)[0]
                assert done[i][0] == "done", done[i]
                assert done[i][1]["text"] == s.tokenizer.decode(want, skip_special_tokens=True), (name, device, i)
                assert job.generated == want[:len(job.generated)] and done[i][1]["completion_tokens"] == len(want)
        assert engine.steps > 0 and not engine.batches
    finally:
        engine.close(timeout=30)


def test_models_health_and_one_shared_base(runs, server, client):
    assert {m.id for m in client.models.list()} == set(runs) | {"base"}
    assert client.models.retrieve("mole").model_extra["moetune"]["expert_type"] == "mole"
    status, health = http(server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["base_copies"] == 1
    chat(client, "lora", "Add 1 and 2", max_tokens=2)
    _, text = http(server.url + "/metrics")
    for name, kind in [("moetune_requests_total", "counter"), ("moetune_prompt_tokens_total", "counter"),
                       ("moetune_completion_tokens_total", "counter"), ("moetune_queue_depth", "gauge"),
                       ("moetune_batch_size", "histogram"), ("moetune_request_latency_seconds", "histogram"),
                       ("moetune_time_to_first_token_seconds", "histogram")]:
        assert f"# TYPE {name} {kind}" in text, name
    assert metric(server.url, "moetune_requests_total", endpoint="/v1/models", status=200) >= 1
    assert metric(server.url, "moetune_request_latency_seconds_count", model="lora") >= 1
    assert metric(server.url, "moetune_time_to_first_token_seconds_count", model="lora") >= 1
    assert metric(server.url, "moetune_prompt_tokens_total", model="lora") > 0


def test_metrics_render_prometheus_text_with_cumulative_histograms():
    from moetune.serve.metrics import Metrics
    m = Metrics()
    for v in (0.07, 0.3, 0.3, 200.0):
        m.observe("moetune_request_latency_seconds", v, model="a")
    m.inc("moetune_completion_tokens_total", 5, model='q"x')
    m.set("moetune_queue_depth", 3)
    lines = m.render().splitlines()
    got = {ln.rsplit(" ", 1)[0]: ln.rsplit(" ", 1)[1] for ln in lines if not ln.startswith("#")}
    assert got['moetune_request_latency_seconds_bucket{le="0.05",model="a"}'] == "0"
    assert got['moetune_request_latency_seconds_bucket{le="0.1",model="a"}'] == "1"
    assert got['moetune_request_latency_seconds_bucket{le="0.5",model="a"}'] == "3"
    assert got['moetune_request_latency_seconds_bucket{le="120",model="a"}'] == "3"
    assert got['moetune_request_latency_seconds_bucket{le="+Inf",model="a"}'] == "4"
    assert got['moetune_request_latency_seconds_count{model="a"}'] == "4"
    assert abs(float(got['moetune_request_latency_seconds_sum{model="a"}']) - 200.67) < 1e-9
    assert got['moetune_completion_tokens_total{model="q\\"x"}'] == "5" and got["moetune_queue_depth"] == "3"
    assert "# TYPE moetune_request_latency_seconds histogram" in lines


def test_runs_share_one_copy_of_the_base_weights(runs):
    """In process: every served model's base tensors ARE the base's (same storage); each model adds only its
    expert layers' own tensors."""
    from moetune.adapters.inject import expert_layers
    from moetune.serve.loading import load_served, unique_bytes
    served = load_served(list(runs.values()), log=lambda m: None)
    base = served["base"].model
    base_ptrs = {t.untyped_storage().data_ptr() for t in [*base.parameters(), *base.buffers()]}
    n_base = len(list(base.parameters()))
    for name, s in served.items():
        if name == "base":
            continue
        own = {id(t) for layer in expert_layers(s.model).values()
               for mod in layer.modules() if mod is not layer.base and not any(mod is b for b in layer.base.modules())
               for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]}
        shared = [t for t in [*s.model.parameters(), *s.model.buffers()] if id(t) not in own]
        assert shared and all(t.untyped_storage().data_ptr() in base_ptrs for t in shared), name
        assert len({id(p) for p in s.model.parameters() if id(p) not in own}) == n_base, name
    total = unique_bytes([s.model for s in served.values()])
    adapters = sum(unique_bytes([s.model]) - unique_bytes([base]) for n, s in served.items() if n != "base")
    assert total == unique_bytes([base]) + adapters


def test_completions_endpoint_text_and_token_ids(runs, server, client, prompts):
    from moetune.eval.generation import Sampling, generate_batch
    from moetune.serve.loading import load_served
    s = load_served([runs["hydra-seq"]], log=lambda m: None)["hydra-seq"]
    ids = s.tokenizer(prompts[0])["input_ids"]
    want = s.tokenizer.decode(generate_batch(s.model, s.tokenizer, [ids], Sampling(max_new_tokens=6), "cpu")[0],
                              skip_special_tokens=True)
    a = client.completions.create(model="hydra-seq", prompt=prompts[0], max_tokens=6, temperature=0)
    b = client.completions.create(model="hydra-seq", prompt=ids, max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="hydra-seq", prompt=prompts[0], max_tokens=6, temperature=0, stream=True) if c.choices)
    assert a.choices[0].text == b.choices[0].text == streamed == want
    assert a.object == "text_completion" and a.usage.prompt_tokens == len(ids)
    default = client.completions.create(model="base", prompt=prompts[0], temperature=0)
    assert default.usage.completion_tokens <= 16                                 # OpenAI's default max_tokens


def test_sampling_options_behave_as_openai_documents(server, client, prompts):
    p = prompts[1]
    greedy, _, _ = chat(client, "molora", p, max_tokens=7)
    with ThreadPoolExecutor(4) as pool:                                          # same seed, different batches
        seeded = list(pool.map(lambda _: chat(client, "molora", p, temperature=1.5, seed=11, max_tokens=12)[0],
                               range(4)))
    assert len(set(seeded)) == 1
    others = {chat(client, "molora", p, temperature=1.5, seed=s, max_tokens=12)[0] for s in range(5)}
    assert len(others) > 1
    assert chat(client, "molora", p, temperature=1.5, top_p=1e-9, max_tokens=7)[0] == greedy   # nucleus of one
    text, finish, use = chat(client, "lora", p, max_tokens=7)
    assert finish == "length" and use.completion_tokens == 7 and len(text) >= 4
    stop = text[2:4]
    for stream in (False, True):
        cut, finish, _ = chat(client, "lora", p, stream=stream, max_tokens=7, stop=[stop, "never-there"])
        assert cut == text[:text.find(stop)] and finish == "stop"
    assert chat(client, "lora", p, max_completion_tokens=2)[2].completion_tokens == 2


def test_routing_extension_returns_the_mean_gates_of_the_request_tokens(runs, server, client, prompts):
    from moetune.eval.generation import Sampling, generate_batch
    from moetune.experts.context import generation_routing
    from moetune.serve.engine import GateTap
    from moetune.serve.loading import load_served
    served = load_served([runs["hydra-seq"], runs["mole"]], log=lambda m: None)
    for name in ("hydra-seq", "mole"):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompts[2]}],
                                           temperature=0, max_tokens=5, extra_body={"moetune_routing": True})
        got = r.model_extra["moetune_routing"]
        s = served[name]
        ids = s.encoder.prompt_ids([{"role": "user", "content": prompts[2]}])
        new = generate_batch(s.model, s.tokenizer, [ids], Sampling(max_new_tokens=5), "cpu")[0]
        fed = got["tokens"] - len(ids)                      # generated tokens the model read (all but the last)
        assert fed == (len(new) if r.choices[0].finish_reason == "stop" else len(new) - 1)
        seq = torch.tensor([ids + new[:fed]])
        tap = GateTap(s.model)
        tap.arm(True)
        with torch.no_grad(), generation_routing(torch.tensor([[1] * len(ids) + [0] * fed])):  # pool the prompt
            s.model(seq)
        want = tap.take()[:, 0].mean(1)                                           # (L, N)
        assert [x["name"] for x in got["layers"]] == tap.names and got["experts"] == want.shape[1]
        torch.testing.assert_close(torch.tensor([x["mean_gates"] for x in got["layers"]]), want, atol=2e-5, rtol=0)
    streamed = list(client.chat.completions.create(model="hydra-seq", messages=[{"role": "user", "content": "x"}],
                                                   stream=True, max_tokens=3, extra_body={"moetune_routing": True}))
    assert "moetune_routing" in streamed[-1].model_extra and streamed[-1].choices[0].finish_reason
    plain = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                           extra_body={"moetune_routing": True})
    assert plain.model_extra["moetune_routing"]["layers"] == []                  # no router: nothing to report


def _msgs(text="Add 1 and 2"):
    return [{"role": "user", "content": text}]


BAD = [  # (path, body or raw bytes, status, error param or None)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": "nope", "messages": _msgs()}, 404, "model"),
    ("/v1/chat/completions", {"messages": _msgs()}, 400, "model"),
    ("/v1/chat/completions", {"model": "lora", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": "lora", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": "lora", "messages": [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": "y"}]}, 400,
     "messages[1].role"),
    ("/v1/chat/completions", {"model": "lora", "messages": _msgs("one two three " * 200)}, 400, "messages"),
    ("/v1/chat/completions", {"model": "lora", "messages": _msgs(), "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "lora", "messages": _msgs(), "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": "lora", "messages": _msgs(), "temperature": -0.5}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "lora", "messages": _msgs(), "bogus": 1}, 400, "bogus"),
    ("/v1/chat/completions", {"model": "lora", "messages": _msgs(), "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/completions", {"model": "lora", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "lora", "prompt": [10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"model": "lora", "prompt": "x", "echo": True}, 400, "echo"),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    got, err = http(server.url + path, "POST", raw=body if isinstance(body, bytes) else None,
                    body=None if isinstance(body, bytes) else body)
    assert got == status and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["message"]
    if param == "messages":
        assert err["error"]["code"] == "context_length_exceeded" and str(CONTEXT) in err["error"]["message"]


def test_openai_client_raises_the_matching_errors_and_routes_and_methods_are_checked(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=_msgs())
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="lora", messages=_msgs(), temperature=-1)
    assert http(server.url + "/v1/chat/completions")[0] == 405
    assert http(server.url + "/v1/nothing", "POST", {})[0] == 404


def _fuzz_cases(rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """n requests that are each wrong somewhere: junk bytes, other JSON, or a good body with bad field values."""
    invalid = {
        "model": [None, 5, "", "nope", [], {}, True],
        "messages": [None, [], "hi", [1], [{"role": "tool", "content": "x"}], [{"role": "user"}],
                     [{"role": "user", "content": 5}], [{"role": "assistant", "content": "x"}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], [[]]],
        "temperature": [-1, 2.5, "hot", True, [], float("nan"), float("inf")],
        "top_p": [-0.1, 1.5, "x", {}],
        "max_tokens": [0, -5, LIMIT + 1, 1.5, "10", 10 ** 12],
        "n": [2, 0, "1", 1.0],
        "stop": [5, [], ["a"] * 5, [""], [1], {"a": 1}],
        "seed": ["s", 1.5, 2 ** 70],
        "stream": ["yes", 1],
        "stream_options": ["x", {"include_usage": "yes"}],
        "logprobs": [True, "x"],
        "tools": [[{"type": "function"}], "x"],
        "presence_penalty": [1.0, 3, "x"],
        "logit_bias": [{"1": 5}, "x"],
        "moetune_routing": ["yes", 1],
        "unknown_field_" + str(rng.randrange(1000)): [1, None, "x"],
    }
    cases = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.15:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
            cases.append(("/v1/chat/completions", raw if raw[:1] not in (b"{", b"[") else b"!" + raw))
        elif kind < 0.25:
            other = rng.choice([[], 1, "s", None, [{"model": "lora"}], {"model": "lora"}, {}])
            cases.append((rng.choice(["/v1/chat/completions", "/v1/completions"]), json.dumps(other).encode()))
        elif kind < 0.3:
            good = json.dumps({"model": "lora", "messages": _msgs()})
            cases.append(("/v1/chat/completions", good[: rng.randrange(1, len(good) - 1)].encode()))
        elif kind < 0.4:
            bad = rng.choice([None, 5, [], ["a", "b"], [-1], [10 ** 9], [True], "", {"x": 1}, [[1], [2]]])
            body = {"model": "lora", "prompt": bad, "max_tokens": 2}
            cases.append(("/v1/completions", json.dumps(body).encode()))
        else:
            body = {"model": "lora", "messages": _msgs(), "max_tokens": 2}
            for key in rng.sample(sorted(invalid), rng.randint(1, 3)):
                body[key] = rng.choice(invalid[key])
            cases.append(("/v1/chat/completions", json.dumps(body).encode()))
    return cases


def test_fuzz_a_few_hundred_malformed_requests_then_a_good_one_is_answered_correctly(server, client, prompts):
    want = chat(client, "hydra-seq", prompts[3], max_tokens=7)[0]
    cases = _fuzz_cases(random.Random(0), 300)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: http(server.url + c[0], "POST", raw=c[1]), cases))
    for (path, raw), (status, err) in zip(cases, results):
        assert 400 <= status < 500, (path, raw[:200], status, err)
        assert isinstance(err, dict) and isinstance(err["error"]["message"], str), (raw[:200], err)
    assert server.proc.poll() is None
    assert chat(client, "hydra-seq", prompts[3], max_tokens=7)[0] == want


def _wait_cancelled(url: str, before: float) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and (metric(url, "moetune_cancelled_requests_total", model="base") == before
                                      or metric(url, "moetune_active_sequences") > 0):
        time.sleep(0.05)


def test_a_client_that_disconnects_cancels_its_generation_and_frees_its_slot(server, client, prompts):
    """Streamed (the client leaves after two tokens) and not (it leaves while its request decodes): the engine
    cancels the generation, the slot frees, fewer than max_tokens tokens are generated, the server goes on."""
    prompt = next((p for p in prompts if chat(client, "base", p, max_tokens=LIMIT)[1] == "length"), None)
    assert prompt is not None, "no prompt whose greedy base answer runs to max_tokens"
    u = urlparse(server.url)
    for stream in (True, False):
        before_tokens = metric(server.url, "moetune_completion_tokens_total", model="base")
        before = metric(server.url, "moetune_cancelled_requests_total", model="base")
        body = json.dumps({"model": "base", "messages": _msgs(prompt), "max_tokens": LIMIT, "temperature": 0,
                           "stream": stream}).encode()
        with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            if stream:
                got = b""
                while got.count(b"data: ") < 3:                                # the role chunk and two tokens
                    got += sock.recv(4096)
            else:
                deadline = time.time() + 30
                while time.time() < deadline and metric(server.url, "moetune_active_sequences") < 1:
                    time.sleep(0.002)                                          # it is decoding: leave now
        _wait_cancelled(server.url, before)
        assert metric(server.url, "moetune_cancelled_requests_total", model="base") == before + 1, stream
        assert metric(server.url, "moetune_active_sequences") == 0
        assert metric(server.url, "moetune_completion_tokens_total", model="base") - before_tokens < LIMIT, stream
    assert chat(client, "base", prompt, max_tokens=4)[1] == "length"            # the server goes on answering


def test_api_key_then_sigterm_drains_in_flight_requests_and_exits_cleanly(runs, tiny_data):
    """A server of its own (a key, --max-batch 1): 401 without the key, then SIGTERM while one request decodes and
    three wait: no new connection is accepted, every in-flight request finishes whole, the process exits 0."""
    server = Server([runs["lora"], "--max-batch", "1", "--api-key-env", "MOETUNE_TEST_KEY"], env={"MOETUNE_TEST_KEY": KEY})
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


def test_serve_argument_errors_exit_2_with_one_paragraph(runs, tmp_path, monkeypatch, capsys):
    run = runs["lora"]
    monkeypatch.delenv("MOETUNE_UNSET_KEY", raising=False)
    assert cli(monkeypatch, "serve", run, "--api-key-env", "MOETUNE_UNSET_KEY") == 2
    assert "MOETUNE_UNSET_KEY is not set" in " ".join(capsys.readouterr().err.split())
    assert cli(monkeypatch, "serve", tmp_path / "missing") == 2
    assert "is not a directory" in capsys.readouterr().err
    twin = tmp_path / "a" / run.name
    twin.parent.mkdir()
    shutil.copytree(run, twin)
    assert cli(monkeypatch, "serve", run, twin) == 2
    assert "directory name of two RUNs" in " ".join(capsys.readouterr().err.split())
    assert cli(monkeypatch, "serve", run, "--max-batch", "0") == 2
