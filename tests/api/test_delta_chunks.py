"""A streamed answer's content chunks are spliced into a template serialised once per stream (`DeltaChunks`): each
must be byte for byte the chunk that dumping its whole dict gives, whatever the text holds."""

from __future__ import annotations

import json

import orjson
import pytest

from api.openai.chat.views import ChatShaper
from api.openai.completions.views import CompletionShaper
from api.openai.generation import DeltaChunks
from farm.inference import Submission

SUB = Submission(job_id="6f1c2a9e-0d4b", model='a "quoted" model', spec="s", created=1, deadline=0)
TEXTS = ["", " hello", 'a "quote", a \\ and a\nnewline', "héllo 🌍 世界", "\x00farm-text\x00", "\u2028</script>"]


@pytest.mark.parametrize("shaper", [ChatShaper(), CompletionShaper()], ids=["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_a_spliced_chunk_is_the_chunk_dumped_whole(shaper: ChatShaper | CompletionShaper, include_usage: bool) -> None:
    deltas = DeltaChunks(shaper, SUB, include_usage=include_usage)
    usage = {"usage": None} if include_usage else {}
    first = {**shaper.chunk(SUB, text="Hi", finish_reason=None, first=True), **usage}
    assert deltas("Hi") == b"data: " + orjson.dumps(first) + b"\n\n"  # with the role, for chat
    for text in TEXTS:
        chunk = {**shaper.chunk(SUB, text=text, finish_reason=None, first=False), **usage}
        assert deltas(text) == b"data: " + orjson.dumps(chunk) + b"\n\n"
        assert json.loads(deltas(text).removeprefix(b"data: ")) == chunk
