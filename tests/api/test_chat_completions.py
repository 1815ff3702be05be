"""`/v1/chat/completions` end to end through the `openai` SDK against a live farm on the tiny model."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.live

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def test_chat_returns_completion_with_usage_counted_by_the_tokenizer(openai_client, tiny_tokenizer):
    response = openai_client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=7, temperature=0)
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert response.model == TINY_MODEL
    assert response.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    expected_prompt_tokens = len(tiny_tokenizer.encode(prompt, add_special_tokens=False))
    assert response.usage.prompt_tokens == expected_prompt_tokens
    assert 1 <= response.usage.completion_tokens <= 7
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    assert (choice.finish_reason == "length") == (response.usage.completion_tokens == 7)


def test_ignore_eos_generates_exactly_max_tokens_and_finishes_with_length(openai_client):
    response = openai_client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert response.usage.completion_tokens == 12
    assert response.choices[0].finish_reason == "length"


def test_same_seed_gives_same_text_and_greedy_is_deterministic(openai_client):
    def ask(**kwargs):
        response = openai_client.chat.completions.create(
            model=TINY_MODEL, messages=MESSAGES, max_tokens=10, extra_body={"ignore_eos": True}, **kwargs
        )
        return response.choices[0].message.content

    assert ask(temperature=1.0, seed=1234) == ask(temperature=1.0, seed=1234)
    assert ask(temperature=0) == ask(temperature=0)


def test_presence_and_frequency_penalties_reach_the_engine(openai_client):
    """Greedy output of the tiny random model repeats tokens; a penalty on repeats must change it."""

    def ask(**kwargs):
        response = openai_client.chat.completions.create(
            model=TINY_MODEL, messages=MESSAGES, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}, **kwargs
        )
        return response.choices[0].message.content

    plain = ask()
    assert ask(frequency_penalty=0) == plain
    assert ask(frequency_penalty=2.0) != plain
    assert ask(presence_penalty=2.0) != plain


def test_stream_matches_non_stream_and_ends_with_usage(openai_client):
    kwargs = {
        "model": TINY_MODEL,
        "messages": MESSAGES,
        "max_tokens": 9,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = openai_client.chat.completions.create(**kwargs)
    chunks = list(openai_client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_without_include_usage_sends_no_usage_chunk(openai_client):
    chunks = list(openai_client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=3, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_stop_sequence_ends_generation_before_it(openai_client):
    base = (
        openai_client.chat.completions.create(
            model=TINY_MODEL, messages=MESSAGES, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .message.content
    )
    assert len(base) > 4
    stop = base[2:4]
    stopped = openai_client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert stop not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"
    assert base.startswith(stopped.choices[0].message.content)


def test_concurrent_requests_all_complete(live_farm):
    import asyncio

    import openai

    async def burst():
        async with openai.AsyncOpenAI(base_url=live_farm.v1, api_key=live_farm.api_key, max_retries=0) as client:
            return await asyncio.gather(
                *[
                    client.chat.completions.create(
                        model=TINY_MODEL, messages=MESSAGES, max_tokens=16, extra_body={"ignore_eos": True}
                    )
                    for _ in range(24)
                ]
            )

    results = asyncio.run(burst())
    assert [r.usage.completion_tokens for r in results] == [16] * 24
    assert len({r.id for r in results}) == 24
