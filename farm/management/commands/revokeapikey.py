"""`manage.py revokeapikey farm-abc123…`: revoke a key by its visible prefix (or the full key)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from farm.api_keys import api_key_find, api_key_revoke
from farm.models import ApiKey


class Command(BaseCommand):
    help = ("Revoke an API key, given its visible prefix (as `listapikeys` shows it) or the full key. API processes "
            "stop accepting it within FARM_KEY_CACHE_S seconds.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", help="the key's prefix or the full key")

    def handle(self, *args: Any, **options: Any) -> None:
        given = options["key"]
        key = api_key_find(given)
        if key is None:
            matches = list(ApiKey.objects.filter(prefix=given[:12]))
            if len(matches) != 1:
                raise CommandError(f"{len(matches)} keys match {given!r}; give the full key or a unique prefix")
            key = matches[0]
        api_key_revoke(key=key)
        self.stdout.write(f"revoked {key.prefix}… ({key.owner})")
