"""`manage.py revokeapikey farm-abc123…` (or `--user alice` for all their keys): revoke keys."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from farm.api_keys import api_key_find, api_key_revoke
from farm.models import ApiKey


class Command(BaseCommand):
    help = (
        "Revoke an API key, given its visible prefix (as `listapikeys` shows it) or the full key, or every "
        "active key of a user with --user. API processes stop accepting it within FARM_KEY_CACHE_S seconds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", nargs="?", help="the key's prefix or the full key")
        parser.add_argument("--user", help="revoke every active key of this user instead")

    def handle(self, *args: Any, **options: Any) -> None:
        given, user = options["key"], options["user"]
        if bool(given) == bool(user):
            raise CommandError("give either a key (prefix or full key) or --user, not both")
        if user:
            keys = list(ApiKey.objects.filter(owner__username=user, revoked_at__isnull=True).select_related("owner"))
        else:
            key = api_key_find(given)
            if key is None:
                keys = list(ApiKey.objects.filter(prefix=given.rstrip("…")[:12]).select_related("owner"))
                if len(keys) != 1:
                    raise CommandError(f"{len(keys)} keys match {given!r}; give the full key or a unique prefix")
            else:
                keys = [key]
        for key in keys:
            api_key_revoke(key=key)
            self.stdout.write(f"revoked {key.prefix}… ({key.owner})")
