"""`moetune serve`: load the runs, start the engine thread, run uvicorn until SIGTERM / Ctrl-C, drain, exit.

Shutdown (SIGTERM or SIGINT): uvicorn stops accepting connections, lets every in-flight request finish
(the engine keeps decoding them) for up to `drain_timeout` seconds, then the engine thread stops and
the process exits with code 0 (SIGTERM) or 130 (Ctrl-C).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import uvicorn

from moetune.core.errors import RecipeError
from moetune.core.ui import console
from moetune.serve.app import build_app
from moetune.serve.engine import Engine
from moetune.serve.loading import load_served
from moetune.serve.metrics import Metrics


def api_key(env: str | None) -> str | None:
    """The bearer key from environment variable `env` (None: no key); RecipeError when it is unset or empty."""
    if env is None:
        return None
    key = os.environ.get(env, "").strip()
    if not key:
        raise RecipeError(f"--api-key-env {env}: the environment variable {env} is not set (or empty). Set it to the "
                          f"key clients must send as 'Authorization: Bearer KEY', e.g. export {env}=$(openssl rand "
                          "-hex 24), or leave --api-key-env out to serve without a key (on 127.0.0.1 only).")
    return key


def _announce(server: uvicorn.Server, sock, names: list[str]) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.02)
    if server.started:
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"moetune serve: listening on http://{host}:{port} (models: {', '.join(names)})", flush=True)


def serve(runs: list[Path], host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          max_tokens_limit: int = 512, api_key_env: str | None = None, device: str | None = None,
          overrides: list[str] | None = None, drain_timeout: float = 60.0) -> None:
    if not runs:
        raise RecipeError("moetune serve needs at least one RUN (a run, export, adapter or merged model directory).")
    if max_batch < 1 or max_tokens_limit < 1:
        raise RecipeError(f"--max-batch and --max-tokens-limit must be >= 1; got {max_batch} and {max_tokens_limit}.")
    key = api_key(api_key_env)
    if key is None and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning[/]: serving on {host} without an API key: anyone who reaches this port can "
                      "use it (--api-key-env VAR sets one).")
    served = load_served(runs, overrides, device, log=lambda m: console.print(m, highlight=False))
    metrics = Metrics()
    engine = Engine(served, max_batch, metrics)
    app = build_app(served, engine, metrics, max_tokens_limit, key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=drain_timeout)
    server = uvicorn.Server(config)
    try:
        sock = config.bind_socket()
    except SystemExit:
        raise RecipeError(f"Cannot listen on {host}:{port} (in use, or not an address of this machine). Pick "
                          "another --port or --host.") from None
    engine.start()
    threading.Thread(target=_announce, args=(server, sock, list(served)), daemon=True).start()
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler lets SIGTERM end in exit 0
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.close(timeout=10)
        sys.stdout.flush()
