"""`manage.py listapikeys [--user alice]`: keys with their state and policy (never the secret)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from farm.models import ApiKey


def policy_text(key: ApiKey) -> str:
    """The key's limits in one short field, `-` when it has none."""
    parts = []
    if key.allowed_models:
        parts.append("models=" + ",".join(key.allowed_models))
    if key.max_tokens_cap is not None:
        parts.append(f"max_tokens={key.max_tokens_cap}")
    if key.rpm_limit is not None:
        parts.append(f"rpm={key.rpm_limit}")
    if key.tpm_limit is not None:
        parts.append(f"tpm={key.tpm_limit}")
    if key.token_quota is not None:
        parts.append(f"quota={key.token_quota}/{key.quota_period}")
    if parts and key.on_limit != "reject":
        parts.append(f"on_limit={key.on_limit}")
    return " ".join(parts) or "-"


class Command(BaseCommand):
    help = "List API keys: prefix, owner, name, state, created, limits. Secrets are never stored, so never shown."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", help="only this owner's keys")

    def handle(self, *args: Any, **options: Any) -> None:
        keys = ApiKey.objects.select_related("owner").order_by("owner__username", "created_at")
        if options["user"]:
            keys = keys.filter(owner__username=options["user"])
        now = timezone.now()
        for key in keys:
            state = "revoked" if key.revoked_at else "expired" if key.expires_at and key.expires_at <= now else "active"
            self.stdout.write(
                f"{key.prefix}…\t{key.owner}\t{key.name or '-'}\t{state}\t{key.created_at:%Y-%m-%d}\t{policy_text(key)}"
            )
