"""Fuzzing of the admin REST API (/api/) from its own OpenAPI schema, with schemathesis.

The schema is read from /api/schema/ with an admin's token (a staff superuser with the `admin`
scope), through Django's WSGI handler in process. Every operation the schema lists gets
generated requests (valid and invalid bodies, path and query parameters). Two tests: no 5xx on
any operation, and all of schemathesis's default checks (documented statuses, content types and
bodies, schema-valid requests accepted, schema-invalid ones refused).

One allowance, the one schemathesis recommends for it: an operation with a request body may
refuse a schema-valid body with 400 when the reason cannot be written in OpenAPI, i.e. a rule
that needs the database or spans fields (`REJECTS_SCHEMA_VALID_BODIES` says which and why).
Such a 400 must still be documented, which the conformance checks verify.

`FEDMCP_API_FUZZ_EXAMPLES` sets the examples per operation (default 25; `make harden`: 100).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.test import Client
from hypothesis import HealthCheck, given, settings

from identity.hostauth.tokens import token_create

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

HARDEN_DIR = os.environ.get("FEDMCP_HARDEN_DIR")
SCHEMA_PATH = "/api/schema/"
HOST = "testserver"
# operationId -> why a schema-valid body can still be refused with 400.
REJECTS_SCHEMA_VALID_BODIES = {
    "peers_create": "name taken; url needed unless stdio, command needed for stdio and must parse; client id and secret together",
    "peers_update": "the url is checked by the model; enabling needs a reachable, valid peer",
    "policies_create": "group names an existing group; model validation of the pattern",
    "policies_update": "group names an existing group; model validation of the pattern",
    "config_import": "rows name existing peers and must pass each model's validation",
}
EXAMPLES = int(os.environ.get("FEDMCP_API_FUZZ_EXAMPLES", "100" if os.environ.get("FEDMCP_HARDEN_DIR") else "25"))


@pytest.fixture
def admin_token(transactional_db: Any, django_user_model: Any) -> str:
    # Committed, not in a rolled-back test transaction: requests go through Django's WSGIHandler,
    # whose request signals close the connection (the test Client switches that off), and the
    # API's catalog writes run through database_sync_to_async, which does the same.
    admin = django_user_model.objects.create_superuser("root-fuzz", "root@example.invalid", "not-a-password-x9")
    return token_create(user=admin, scope="admin", resource=f"http://{HOST}", expires_in=timedelta(hours=1))


def load_schema(token: str) -> Any:
    probe = Client(HTTP_AUTHORIZATION=f"Bearer {token}").get(SCHEMA_PATH, HTTP_ACCEPT="application/json")
    if probe.status_code == 404:
        pytest.skip(f"{SCHEMA_PATH} does not exist yet: the admin API is not mounted")
    assert probe.status_code == 200, probe.status_code
    config = SchemathesisConfig.from_dict({
        "operations": [
            {"include-operation-id": operation_id,
             "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "409"]}}}
            for operation_id in REJECTS_SCHEMA_VALID_BODIES
        ],
    })
    return schemathesis.openapi.from_wsgi(SCHEMA_PATH, WSGIHandler(), config=config, headers={"Authorization": f"Bearer {token}", "Host": HOST})


def fuzz_operations(token: str, checks: list[Any] | None) -> tuple[int, dict[str, str]]:
    """Run every operation of the schema; return (operations, failure text by operation)."""
    schema = load_schema(token)
    headers = {"Authorization": f"Bearer {token}", "Host": HOST}
    failures: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not HARDEN_DIR, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=checks)

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as error:  # every failing operation, then fail once
            failures[operation.label] = f"{type(error).__name__}: {error}"[:1500]
    return operations, failures


def write_figures(name: str, operations: int, failures: dict[str, str]) -> None:
    if HARDEN_DIR:
        Path(HARDEN_DIR).mkdir(parents=True, exist_ok=True)
        figures = {"operations": operations, "examples_per_operation": EXAMPLES, "failures": len(failures), "failing": failures}
        (Path(HARDEN_DIR) / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")


def test_the_admin_api_never_answers_a_server_error(admin_token: str) -> None:
    """Schemathesis's schema-derived requests, valid and invalid: no 5xx on any operation."""
    operations, failures = fuzz_operations(admin_token, [not_a_server_error])
    write_figures("api-no-5xx", operations, failures)
    assert operations, "the schema lists no operation"
    assert not failures, "\n\n".join(f"{label}\n{text}" for label, text in failures.items())


def test_the_admin_api_answers_as_its_schema_says(admin_token: str) -> None:
    """All of schemathesis's default checks (documented statuses, content types, bodies)."""
    operations, failures = fuzz_operations(admin_token, None)
    write_figures("api-conformance", operations, failures)
    assert not failures, "\n\n".join(f"{label}\n{text}" for label, text in failures.items())
