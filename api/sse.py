"""Server-sent event streams that end with `data: [DONE]`, sent with one write fewer than Django sends them."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

from django.http import StreamingHttpResponse

DONE = b"data: [DONE]\n\n"


class SseResponse(StreamingHttpResponse):
    """A `text/event-stream` whose content ends with a chunk that ends with `DONE`, and nothing after it.

    Django's handler ends a streaming response with an empty message after its last chunk, which uvicorn writes on
    its own (the chunked encoding's terminator): one more write for the API and one more wake-up for the client per
    stream. `sse_send` ends the response with the chunk that carries `DONE` instead."""

    def __init__(self, content: Any) -> None:
        super().__init__(content, content_type="text/event-stream")
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"


async def sse_send(response: SseResponse, send: Any) -> None:
    """Sends `response` over ASGI as Django's `ASGIHandler.send_response` does, except that the chunk that ends with
    `DONE` ends the response (a stream cut short still gets Django's empty closing message)."""
    headers = [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()]
    headers += [(b"Set-Cookie", c.output(header="").encode("ascii").strip()) for c in response.cookies.values()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    ended = False
    async with aclosing(aiter(response)) as content:
        # Iterated to its end, not closed at `DONE`: closing a generator raises GeneratorExit at its last yield,
        # which a view's stream reads as the client leaving (and cancels the finished job).
        async for chunk in content:
            if ended or not chunk:  # nothing may follow the end
                continue
            ended = chunk.endswith(DONE)
            await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
    if not ended:
        await send({"type": "http.response.body"})
