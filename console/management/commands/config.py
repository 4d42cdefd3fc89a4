"""`manage.py config export FILE` / `manage.py config import FILE` (FILE "-" is stdout/stdin)."""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from console.services import SECRET_FIELDS, ConfigImportError, config_export, config_import


class Command(BaseCommand):
    help = "Export or import the gateway configuration (peers, catalog switches, rate limits, policies); secrets are never exported."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("action", choices=["export", "import"])
        parser.add_argument("file", help="Path of the JSON file, or - for stdout/stdin.")

    def handle(self, *args: Any, action: str, file: str, **options: Any) -> None:
        if action == "export":
            text = json.dumps(config_export(), indent=2, sort_keys=True)
            if file == "-":
                self.stdout.write(text)
            else:
                with open(file, "w", encoding="utf-8") as out:
                    out.write(text + "\n")
                left_out = ", ".join(f"peer.{f}" for f in SECRET_FIELDS)
                self.stderr.write(f"Wrote {file} (left out: {left_out}).")
            return
        try:
            raw = sys.stdin.read() if file == "-" else open(file, encoding="utf-8").read()  # noqa: SIM115
            counts = config_import(document=json.loads(raw))
        except (OSError, json.JSONDecodeError, ConfigImportError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write("Imported " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ".")
