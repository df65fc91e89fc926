"""The HTTP side: a FastAPI app over the engine (OpenAI routes, /health, /metrics), bearer-key check, errors.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON, or server-sent events with
`"stream": true`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics`. Every error is
OpenAI's JSON error object with a 4xx status (unknown route 404, wrong method 405, body over 4 MiB 413,
anything `protocol` refuses 400/404, a missing or wrong key 401); the engine failing a forward is a 500
for that request only. A request whose client disconnects is cancelled in the engine (its batch slot
frees before the next decode step), streamed or not. With an API key, `/v1/*` needs
`Authorization: Bearer KEY`; `/health` and `/metrics` stay open for probes and scrapers.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moetune.serve.engine import Engine, Job
from moetune.serve.loading import Served, unique_bytes
from moetune.serve.metrics import Metrics
from moetune.serve.protocol import (APIError, Parsed, chat_chunk, chat_response, completion_chunk, completion_response,
                                    new_id, parse_chat, parse_completion, usage)

MAX_BODY = 4 * 2 ** 20
STARTED = int(time.time())


class Guard:
    """ASGI middleware: the bearer key on /v1/*, and a request count by route and status for /metrics."""

    def __init__(self, app, key: str | None, metrics: Metrics) -> None:
        self.app, self.key, self.metrics = app, key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions") \
            else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.key is not None and path.startswith("/v1/") and not self._authorised(scope):
                err = APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY' (the value "
                                    "of the server's --api-key-env variable).", None, "invalid_api_key")
                return await JSONResponse(err.body(), 401)(scope, receive, counted)
            return await self.app(scope, receive, counted)
        finally:
            self.metrics.inc("moetune_requests_total", endpoint=route, status=status["code"])

    def _authorised(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        got = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode())


async def read_json(request: Request) -> dict:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise APIError(413, f"The request body is larger than {MAX_BODY // 2 ** 20} MiB.", None, "request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request: it is not valid JSON. (The body must be "
                            "a JSON object, sent with Content-Type: application/json.)", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got a JSON {type(data).__name__}.", None,
                       "invalid_json")
    return data


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def events(engine: Engine, p: Parsed, request: Request):
    """Submit the request to the engine; yield its events (kind, data) until 'done' or 'error'. A client that
    disconnects (or a cancelled handler) cancels the job in the engine."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, data: dict) -> None:                   # called on the engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, data))
        except RuntimeError:                                     # the event loop is closed: nobody listens
            pass

    job = Job(p, emit)
    engine.submit(job)
    gone = asyncio.ensure_future(_disconnect(request))
    finished = False
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return
            kind, data = get.result()
            finished = kind in ("done", "error")
            yield kind, data
            if finished:
                return
    finally:
        gone.cancel()
        if not finished:
            engine.cancel(job)


def build_app(served: dict[str, Served], engine: Engine, metrics: Metrics, limit: int, key: str | None) -> FastAPI:
    app = FastAPI(title="moetune serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        what = {404: f"Unknown path {request.url.path!r}: see GET /v1/models; routes are /v1/chat/completions, "
                     "/v1/completions, /v1/models, /health, /metrics.",
                405: f"Method {request.method} is not allowed on {request.url.path}."}.get(e.status_code, str(e.detail))
        return JSONResponse(APIError(e.status_code, what).body(), e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", kind="server_error").body(), 500)

    weights = unique_bytes([s.model for s in served.values()])

    def card(s: Served) -> dict:
        return {"id": s.name, "object": "model", "created": STARTED, "owned_by": "moetune",
                "moetune": {"expert_type": s.expert_type, "source": s.label, "context": s.context}}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(served), "queue_depth": metrics.value("moetune_queue_depth"),
                "active_sequences": metrics.value("moetune_active_sequences"),
                "base_copies": len({s.base_key for s in served.values()}), "weight_bytes": weights}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(s) for s in served.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in served:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")
        return card(served[name])

    async def answer(request: Request, parse, chunk, whole, prefix: str):
        p = parse(await read_json(request), served, limit)
        rid, created = new_id(prefix), int(time.time())
        stream = events(engine, p, request)
        if not p.stream:
            async for kind, data in stream:
                if kind == "error":
                    return JSONResponse(APIError(500, data["message"], kind="server_error").body(), 500)
                if kind == "done":
                    return JSONResponse(whole(rid, p.model, data))
            return Response(status_code=499)                       # the client went away: nobody reads this

        async def sse():
            if chunk is chat_chunk:
                yield _sse(chunk(rid, p.model, created, {"role": "assistant", "content": ""}))
            async for kind, data in stream:
                if kind == "delta":
                    body = {"content": data["text"]} if chunk is chat_chunk else data["text"]
                    yield _sse(chunk(rid, p.model, created, body))
                elif kind == "error":
                    yield _sse(APIError(500, data["message"], kind="server_error").body())
                    break
                else:
                    extra = {"moetune_routing": data["routing"]} if "routing" in data else {}
                    yield _sse(chunk(rid, p.model, created, {} if chunk is chat_chunk else "", data["finish_reason"],
                                     **extra))
                    if p.include_usage:
                        last = chunk(rid, p.model, created, {} if chunk is chat_chunk else "")
                        last["choices"], last["usage"] = [], usage(data)
                        yield _sse(last)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, parse_chat, chat_chunk, chat_response, "chatcmpl")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, parse_completion, completion_chunk, completion_response, "cmpl")

    return Guard(app, key, metrics)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
