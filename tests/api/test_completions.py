"""`/v1/completions` end to end through the `openai` SDK against a live farm on the tiny model."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.live

PROMPT = "The farm reads a short story"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


def prompt_tokens(tokenizer, prompt: str) -> int:
    """What the worker counts: the prompt encoded as is (the tiny tokenizer adds no special tokens)."""
    return len(tokenizer.encode(prompt))


def test_completion_defaults_to_16_tokens_with_exact_usage(openai_client: openai.OpenAI, tiny_tokenizer) -> None:
    response = openai_client.completions.create(model=TINY_MODEL, prompt=PROMPT, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert response.object == "text_completion"
    assert response.id.startswith("cmpl-")
    assert response.model == TINY_MODEL
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "length", None)
    assert isinstance(choice.text, str) and choice.text
    assert response.usage.prompt_tokens == prompt_tokens(tiny_tokenizer, PROMPT)
    assert response.usage.completion_tokens == DEFAULT_MAX_TOKENS
    assert response.usage.total_tokens == response.usage.prompt_tokens + DEFAULT_MAX_TOKENS


@pytest.mark.parametrize("prompt", ["Hello", "héllo wörld, 你好 🌍 " * 5, ["Number 42 is fine."]])
def test_prompt_tokens_match_the_tokenizer(
    openai_client: openai.OpenAI, tiny_tokenizer, prompt: str | list[str]
) -> None:
    response = openai_client.completions.create(
        model=TINY_MODEL, prompt=prompt, max_tokens=3, extra_body={"ignore_eos": True}
    )
    text = prompt if isinstance(prompt, str) else prompt[0]
    assert response.usage.prompt_tokens == prompt_tokens(tiny_tokenizer, text)
    assert response.usage.completion_tokens == 3


def test_stream_text_equals_non_stream_text_at_temperature_0(openai_client: openai.OpenAI) -> None:
    kwargs = {
        "model": TINY_MODEL,
        "prompt": PROMPT,
        "max_tokens": 11,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = openai_client.completions.create(**kwargs)
    chunks = list(openai_client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert whole.usage.completion_tokens == 11


def test_stream_without_include_usage_has_no_usage(openai_client: openai.OpenAI) -> None:
    chunks = list(
        openai_client.completions.create(
            model=TINY_MODEL, prompt=PROMPT, max_tokens=4, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_several_prompts_in_one_request_are_400(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model=TINY_MODEL, prompt=["one", "two"])
    assert caught.value.param == "prompt"


@pytest.mark.parametrize("unsupported", [{"echo": True}, {"suffix": "end"}, {"logprobs": 2}])
def test_unsupported_options_are_400(openai_client: openai.OpenAI, unsupported: dict[str, object]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model=TINY_MODEL, prompt=PROMPT, **unsupported)
    assert caught.value.param == next(iter(unsupported))
