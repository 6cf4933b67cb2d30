"""The little HTTP plumbing the server needs on top of plain ASGI.

A `Request` reads its body with a size limit (refusing early on a large
Content-Length, and while streaming otherwise) and decodes JSON into a
`Refusal` on any malformation; a `Response` is status, headers and bytes;
`Router` matches a method and a path pattern to a handler. Nothing here
knows about libraries or entries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from remote.server.commits import Refusal

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class Response:
    """Status, headers and a body: `body`, or `parts` sent one ASGI message each.

    `parts` lets a large answer (a batch of chunks) go out piece by piece
    instead of being joined into one more copy of many megabytes first.
    """

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    parts: list[bytes] | None = None

    @classmethod
    def json(cls, data: object, status: int = 200) -> Response:
        body = json.dumps(data, separators=(",", ":")).encode()
        return cls(status, body, [("content-type", "application/json")])

    @classmethod
    def error(cls, refusal: Refusal) -> Response:
        return cls.json(refusal.body(), refusal.status)

    async def send(self, send: Send, *, head: bool = False) -> None:
        parts = [self.body] if self.parts is None else self.parts
        headers = [(k.encode(), v.encode()) for k, v in self.headers]
        headers.append((b"content-length", str(sum(map(len, parts))).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if head or not parts:
            await send({"type": "http.response.body", "body": b""})
            return
        for part in parts[:-1]:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": parts[-1]})


class Request:
    """One HTTP request; the body is read on demand, at most once."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query = {
            k: v[-1]
            for k, v in parse_qs(scope.get("query_string", b"").decode("utf-8", "replace")).items()
        }
        self.headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
        }
        self._receive = receive

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    async def body(self, limit: int) -> bytes:
        """The whole body; 413 as soon as it is known to exceed `limit` bytes."""
        declared = self.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refusal(400, "bad_request", "Content-Length is not a number")
            if int(declared) > limit:
                raise _too_large(self, int(declared), limit)
        parts: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise Refusal(400, "bad_request", "the client went away mid-request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(self, size, limit)
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def json(self, limit: int) -> dict[str, Any]:
        """The body as a JSON object, or a 400 saying what is wrong with it."""
        raw = await self.body(limit)
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise Refusal(400, "malformed_json", f"{self.method} {self.path}: {exc}") from None
        if not isinstance(data, dict):
            raise Refusal(400, "malformed_json", f"{self.method} {self.path}: expected an object")
        return data

    def int_param(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise Refusal(400, "bad_request", f"{name}={raw!r} is not an integer") from None
        if not low <= value <= high:
            raise Refusal(400, "bad_request", f"{name}={value} is outside {low}..{high}")
        return value

    def float_param(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.query.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise Refusal(400, "bad_request", f"{name}={raw!r} is not a number") from None
        if not low <= value <= high:  # also false for NaN
            raise Refusal(400, "bad_request", f"{name}={raw} is outside {low}..{high}")
        return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _too_large(request: Request, size: int, limit: int) -> Refusal:
    return Refusal(
        413,
        "payload_too_large",
        f"{request.method} {request.path}: body of {size} bytes exceeds the limit of {limit}",
    )


Handler = Callable[..., Awaitable[Response]]


class Router:
    """Method + path pattern -> handler; `{name}` segments become keyword arguments."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.compile("\\A" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "\\Z")
        for existing, handlers in self._routes:
            if existing.pattern == regex.pattern:
                handlers[method] = handler
                return
        self._routes.append((regex, {method: handler}))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        for regex, handlers in self._routes:
            found = regex.match(path)
            if found:
                lookup = "GET" if method == "HEAD" else method
                if lookup not in handlers:
                    raise Refusal(405, "method_not_allowed", f"{method} is not supported on {path}")
                return handlers[lookup], found.groupdict()
        raise Refusal(404, "not_found", f"no endpoint at {path}")
