"""`manage.py loadmodels deploy/models/demo.yaml`: declare a farm's models and specs in one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from django.core.management.base import BaseCommand, CommandError, CommandParser

from farm.catalog import catalog_load, spec_catalog_publish


class Command(BaseCommand):
    help = (
        "Create or update models and their specs from a YAML file (see deploy/models/demo.yaml), then publish "
        "the spec catalogue to Redis for workers."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--no-publish", action="store_true", help="do not write the catalogue to Redis")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            data = yaml.safe_load(options["file"].read_text())
            specs = catalog_load(data or {})
        except (OSError, yaml.YAMLError, ValueError, KeyError) as exc:
            raise CommandError(f"{options['file']}: {exc}") from exc
        for spec in specs:
            self.stdout.write(f"{spec.model.name} -> {spec.name} ({spec.engine}, weight {spec.weight})")
        if not options["no_publish"]:
            spec_catalog_publish()
