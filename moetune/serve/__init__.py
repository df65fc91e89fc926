"""`moetune serve`: an OpenAI-compatible HTTP server for trained runs, every expert type, with continuous batching.

loading (runs on one shared base) -> batch (KV-cache rows that join and leave) -> engine (the decode
loop on its own thread) -> protocol (OpenAI request checks and responses) -> app (FastAPI routes) ->
server (uvicorn, signals). No training code: it generates as `moetune generate` does, batched.
"""
