"""`bench.api_overhead` drives the API's real ASGI application in-process: every request must get the view's 404,
or the figure would time some other path (a 401 from a key that did not authenticate, say)."""

from __future__ import annotations

import asyncio

import pytest
from django.contrib.auth import get_user_model

from bench.api_overhead import measure
from farm.api_keys import api_key_create

pytestmark = pytest.mark.django_db(transaction=True)


def test_every_measured_request_is_answered_by_the_view() -> None:
    _, raw = api_key_create(owner=get_user_model().objects.create(username="bench-api"), name="bench")
    per_round = asyncio.run(measure(raw, rounds=2, requests=20))
    assert len(per_round) == 2 and all(us > 0 for us in per_round)


def test_a_key_that_does_not_authenticate_stops_the_measure() -> None:
    with pytest.raises(SystemExit, match=r"got \[401\]"):
        asyncio.run(measure("sk-not-a-key", rounds=1, requests=20))
