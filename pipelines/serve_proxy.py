"""JSON errors from Serve's own proxy: its 408 (deadline) and 503/500 answers come as plain text.

Serve's HTTP proxy calls the function named by $RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH when it starts
and wraps itself in the Starlette middlewares it returns. `JsonProxyErrors` rewrites the proxy's plain-text
error bodies into the endpoint's `{"error", "detail"}` JSON; the application's answers (never plain text)
pass through untouched. Ray's processes read the variable from their environment: `start_server` sets it
before starting Ray; on a cluster, cluster/kuberay/segpipe-env.yaml sets it for every Ray container.
It is a module of its own, outside `pipelines.serve`, so the proxy imports only this (json and Starlette),
not the application: the proxy must pass Serve's 5-second readiness check even on a busy node.
"""

from __future__ import annotations

import json

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "pipelines.serve_proxy.middlewares"
ERROR_CODES = {408: "timeout", 429: "overloaded", 500: "internal", 503: "overloaded"}


class JsonProxyErrors:
    """Pure ASGI middleware: a plain-text 408/429/500/503 answer becomes {"error": code, "detail": text}."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict | None = None  # the start message of a plain-text error, until its body arrives
        chunks: list[bytes] = []

        async def rewrite(message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                plain = headers.get(b"content-type", b"").startswith(b"text/plain")
                if message["status"] in ERROR_CODES and plain:
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                detail = b"".join(chunks).decode("utf-8", "replace")
                body = json.dumps({"error": ERROR_CODES[held["status"]], "detail": detail}).encode()
                kept = [
                    (k, v)
                    for k, v in held.get("headers", [])
                    if k not in (b"content-type", b"content-length")
                ]
                headers = [
                    *kept,
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, rewrite)


def middlewares() -> list:
    """The proxy callback: the middlewares Serve's proxy wraps itself in."""
    from starlette.middleware import Middleware

    return [Middleware(JsonProxyErrors)]
