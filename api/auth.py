"""API key authentication: `Authorization: Bearer <key>` for async OpenAI views and for DRF resource views."""

from __future__ import annotations

from django.http import HttpRequest
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from farm.api_keys import KeyPrincipal, api_key_authenticate, api_key_authenticate_sync
from farm.errors import Unauthenticated


def bearer_token(request: HttpRequest) -> str:
    header = request.META.get("HTTP_AUTHORIZATION", "")  # not `request.headers`: that parses every header
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    return token.strip()


async def authenticate(request: HttpRequest) -> KeyPrincipal:
    principal = await api_key_authenticate(bearer_token(request))
    if principal is None:
        raise Unauthenticated("Incorrect API key provided.")
    return principal


class ApiKeyAuthentication(BaseAuthentication):
    """DRF: `request.user` is the key's owner, `request.auth` its `KeyPrincipal`."""

    def authenticate(self, request: Request) -> tuple[object, KeyPrincipal] | None:
        try:
            token = bearer_token(request._request)
        except Unauthenticated as exc:
            raise AuthenticationFailed(exc.message) from None
        principal = api_key_authenticate_sync(token)
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        from django.contrib.auth import get_user_model

        return get_user_model().objects.get(pk=principal.owner_id), principal

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"
