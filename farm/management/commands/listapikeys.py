"""`manage.py listapikeys [--user alice]`: keys with their state (never the secret)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from farm.models import ApiKey


class Command(BaseCommand):
    help = "List API keys: prefix, owner, name, state. Secrets are never stored, so never shown."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", help="only this owner's keys")

    def handle(self, *args: Any, **options: Any) -> None:
        keys = ApiKey.objects.select_related("owner").order_by("owner__username", "created_at")
        if options["user"]:
            keys = keys.filter(owner__username=options["user"])
        now = timezone.now()
        for key in keys:
            state = ("revoked" if key.revoked_at else
                     "expired" if key.expires_at and key.expires_at <= now else "active")
            self.stdout.write(f"{key.prefix}…\t{key.owner}\t{key.name or '-'}\t{state}\t{key.created_at:%Y-%m-%d}")
