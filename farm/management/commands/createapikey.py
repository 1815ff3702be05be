"""`manage.py createapikey --user alice`: creates an API key and prints it once."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from farm.api_keys import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a user (created if missing) and print the key. It is shown only this once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="owner's username (created without a password if missing)")
        parser.add_argument("--name", default="", help="a label for the key, e.g. 'ci' or 'notebook'")
        parser.add_argument("--key", default=None, help="use this exact key (for scripts); default: a random one")

    def handle(self, *args: Any, **options: Any) -> None:
        user, _ = get_user_model().objects.get_or_create(username=options["user"])
        _, raw = api_key_create(owner=user, name=options["name"], raw_key=options["key"])
        self.stdout.write(raw)
