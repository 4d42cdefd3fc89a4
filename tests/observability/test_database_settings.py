"""PostgreSQL connections are bounded: a database that vanishes without a reset cannot hang a worker.

The settings are read in a fresh interpreter with DATABASE_URL pointing at the machine's
PostgreSQL (127.0.0.1:5432, as in tests/e2e/test_scale_out.py; FEDMCP_E2E_POSTGRES overrides),
and a real connection is opened with them, so libpq itself accepts every option.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from django.test import SimpleTestCase

ROOT = Path(__file__).resolve().parents[2]
POSTGRES = os.environ.get("FEDMCP_E2E_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

PROBE = """
import json, django
django.setup()
from django.conf import settings
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
    assert cursor.fetchone() == (1,)
print(json.dumps({"options": settings.DATABASES["default"]["OPTIONS"], "libpq": connection.connection.info.get_parameters()}))
"""


def probe(**env: str) -> dict:
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "fedmcp_site.settings", "DATABASE_URL": POSTGRES, **env}
    environment.pop("REDIS_URL", None)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


class PostgresConnectionTests(SimpleTestCase):
    def test_defaults_bound_connects_and_dead_connections(self) -> None:
        seen = probe()
        self.assertEqual(seen["options"], {
            "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 4, "tcp_user_timeout": 15000,
        })
        # libpq took them (it reports the parameters it was given that differ from its defaults).
        self.assertEqual(seen["libpq"]["connect_timeout"], "5")
        self.assertEqual(seen["libpq"]["tcp_user_timeout"], "15000")
        self.assertEqual(seen["libpq"]["keepalives_idle"], "5")

    def test_the_bounds_follow_the_environment_with_a_floor(self) -> None:
        seen = probe(FEDMCP_DB_DEAD_AFTER="60", FEDMCP_DB_CONNECT_TIMEOUT="1")
        self.assertEqual(seen["options"]["tcp_user_timeout"], 60000)
        self.assertEqual(seen["options"]["keepalives_idle"], 20)
        self.assertEqual(seen["options"]["keepalives_interval"], 10)
        self.assertEqual(seen["options"]["connect_timeout"], 2)  # libpq treats 1 as 2 anyway
