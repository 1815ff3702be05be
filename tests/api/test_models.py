"""`/v1/models` end to end: public model names from the catalogue, never their specs."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import TINY_MODEL, TINY_SPEC, UNSERVED_MODEL, LiveFarm

pytestmark = pytest.mark.live


def test_list_has_every_enabled_model(openai_client: openai.OpenAI) -> None:
    models = {model.id: model for model in openai_client.models.list()}
    assert {TINY_MODEL, UNSERVED_MODEL} <= set(models)
    assert TINY_SPEC not in models
    for model in models.values():
        assert model.object == "model"
        # Fine-tuned models (`<base>:ft-<id>`, tests/api/test_fine_tuning.py) are owned by whoever trained them.
        assert model.owned_by == "farm" or ":ft-" in model.id
        assert model.created > 1_600_000_000


def test_retrieve_one_model(openai_client: openai.OpenAI) -> None:
    model = openai_client.models.retrieve(TINY_MODEL)
    assert (model.id, model.object, model.owned_by) == (TINY_MODEL, "model", "farm")
    listed = next(m for m in openai_client.models.list() if m.id == TINY_MODEL)
    assert model.created == listed.created


@pytest.mark.parametrize("name", ["no-such-model", TINY_SPEC, "org/no-such-model"])
def test_retrieve_unknown_model_is_not_found(openai_client: openai.OpenAI, name: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.models.retrieve(name)
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/models", f"/v1/models/{TINY_MODEL}"])
def test_models_need_a_key(live_farm: LiveFarm, path: str) -> None:
    response = httpx.get(f"{live_farm.base_url}{path}", timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live_farm.v1, api_key="farm-wrong", max_retries=0).models.list()
