"""Client disconnects, seen where they arrive: the ASGI layer.

A streaming view learns that its client left when Django cancels its task, and only if the cancellation lands inside
the view's own generator. When it lands elsewhere (in Django's send loop), Django closes its wrapper around the
generator but not the generator itself, which then waits for the garbage collector; the job would go on generating
for nobody and its key would stay charged. `DisconnectWatch` sees the `http.disconnect` message itself and calls what
the view registered with `on_client_disconnect`, at once, whatever Django does next.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

Callback = Callable[[], None]

_callbacks: ContextVar[list[Callback] | None] = ContextVar("client_disconnect_callbacks", default=None)


def on_client_disconnect(callback: Callback) -> Callback:
    """Calls `callback` if this request's client disconnects before the response is complete; returns the function
    that unregisters it. A no-op outside `DisconnectWatch` (tests calling views directly)."""
    callbacks = _callbacks.get()
    if callbacks is None:
        return lambda: None
    callbacks.append(callback)

    def unregister() -> None:
        if callback in callbacks:
            callbacks.remove(callback)

    return unregister


class DisconnectWatch:
    """ASGI middleware: one callback list per HTTP request, run when the client's `http.disconnect` arrives first."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        callbacks: list[Callback] = []
        complete = False

        async def watched_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                for callback in list(callbacks):
                    callbacks.remove(callback)
                    callback()
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        token = _callbacks.set(callbacks)
        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            _callbacks.reset(token)
