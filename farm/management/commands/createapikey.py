"""`manage.py createapikey --user alice [--models a,b] [--rpm 60] [--tpm 100000] [--quota 1000000 --period month]`:
creates an API key with its policy and prints it once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from farm.api_keys import api_key_create
from farm.models import OnLimit, QuotaPeriod


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = (
        "Create an API key for a user (created if missing) and print the key. It is shown only this once. "
        "Limits are optional; a key without them is unlimited."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="owner's username (created without a password if missing)")
        parser.add_argument("--name", default="", help="a label for the key, e.g. 'ci' or 'notebook'")
        parser.add_argument("--key", default=None, help="use this exact key (for scripts); default: a random one")
        parser.add_argument("--expires-in-days", type=float, default=None, help="the key stops working after this")
        parser.add_argument("--models", default="", help="comma-separated models the key may use (default: all)")
        parser.add_argument("--max-tokens", type=positive, default=None, help="largest max_tokens a request may ask")
        parser.add_argument("--rpm", type=positive, default=None, help="requests per minute")
        parser.add_argument(
            "--tpm",
            type=positive,
            default=None,
            help="tokens per minute (prompt estimate + max_tokens reserved per request)",
        )
        parser.add_argument("--quota", type=positive, default=None, help="tokens per --period")
        parser.add_argument("--period", choices=QuotaPeriod.values, default=QuotaPeriod.DAY, help="quota period (UTC)")
        parser.add_argument(
            "--on-limit",
            choices=OnLimit.values,
            default=OnLimit.REJECT,
            help="over a limit: 429 at once (reject), or wait up to FARM_RATE_LIMIT_MAX_WAIT_S",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user, _ = get_user_model().objects.get_or_create(username=options["user"])
        days = options["expires_in_days"]
        try:
            _, raw = api_key_create(
                owner=user,
                name=options["name"],
                raw_key=options["key"],
                expires_at=timezone.now() + timedelta(days=days) if days is not None else None,
                allowed_models=[m.strip() for m in options["models"].split(",") if m.strip()],
                max_tokens_cap=options["max_tokens"],
                rpm_limit=options["rpm"],
                tpm_limit=options["tpm"],
                token_quota=options["quota"],
                quota_period=options["period"],
                on_limit=options["on_limit"],
            )
        except ValidationError as exc:
            raise CommandError(f"invalid key policy: {exc}") from exc
        self.stdout.write(raw)
