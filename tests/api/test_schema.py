"""The OpenAPI document is valid, and every operation in it answers as it describes."""

from __future__ import annotations

from typing import Any

from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from tests.api.common import ApiTestCase

BODIES: dict[str, Any] = {
    "peers_create": {"name": "made-here", "transport": "streamable-http", "url": "http://127.0.0.1:9/mcp", "sync": False},
    "peers_update": {"call_timeout": 30},
    "policies_create": {"peer": "files", "kind": "prompt", "name_pattern": "*", "decision": "deny"},
    "policies_update": {"priority": 9},
}


class SchemaTest(ApiTestCase):
    def schema(self) -> dict[str, Any]:
        reply = self.api.get("/api/schema/", {"format": "json"})
        assert reply.status_code == 200
        return reply.json()

    def test_the_schema_is_a_valid_openapi_3_document(self) -> None:
        document = self.schema()
        validate(document)
        assert document["openapi"].startswith("3.")

    def test_every_operation_answers_without_a_server_error_and_as_the_schema_says(self) -> None:
        document = self.schema()
        operations = [
            (path, method, op) for path, item in document["paths"].items() for method, op in item.items()
            if method in ("get", "post", "patch", "put", "delete")
        ]
        # Deletions last, so the other operations still find the peer.
        operations.sort(key=lambda o: o[1] == "delete")
        BODIES["config_import"] = self.api.get("/api/config/export").json()
        seen, problems = set(), []
        for path, method, op in operations:
            url = (
                path.replace("{peer_id}", str(self.peer.pk)).replace("{entry_id}", str(self.tool.pk))
                .replace("{policy_id}", str(self.policy.pk)).replace("{grant_id}", str(self.grant.pk))
            )
            body = BODIES.get(op["operationId"])
            if body is None:
                reply = getattr(self.api, method)(url)
            else:
                reply = getattr(self.api, method)(url, body, content_type="application/json")
            seen.add(op["operationId"])
            if reply.status_code >= 400:
                problems.append(f"{method.upper()} {url}: {reply.status_code} {reply.content[:300]!r}")
                continue
            described = op["responses"].get(str(reply.status_code))
            if described is None:
                problems.append(f"{method.upper()} {url}: undocumented status {reply.status_code}")
                continue
            content = (described.get("content") or {}).get("application/json")
            if content is None:
                continue
            schema = {**content["schema"], "components": document["components"]}
            errors = [e.message for e in OAS30Validator(schema).iter_errors(reply.json())]
            if errors:
                problems.append(f"{method.upper()} {url}: {[e[-300:] for e in errors[:3]]}")
        assert not problems, problems
        assert len(seen) == len(operations) >= 19

    def test_every_operation_documents_the_errors_it_can_answer(self) -> None:
        document = self.schema()
        for path, item in document["paths"].items():
            for method, op in item.items():
                statuses = set(op["responses"])
                expected = {"401", "403"}
                if "{" in path or any(p["name"] == "page" for p in op.get("parameters", [])):
                    expected.add("404")
                if "requestBody" in op:
                    expected |= {"400", "415"}
                assert expected <= statuses, (method, path, sorted(statuses))
                for status in statuses - {"204"}:
                    assert "application/json" in op["responses"][status].get("content", {}), (method, path, status)

    def test_a_path_no_view_serves_gets_a_json_404(self) -> None:
        for path in ("/api/peers/-1/", "/api/nothing-here/", "/api/peers/1/nothing/"):
            reply = self.api.post(path) if path.endswith("nothing/") else self.api.get(path)
            assert reply.status_code == 404, path
            assert reply.json() == {"detail": "Not found."}, path
        # Without the trailing slash, Django still redirects to the view.
        assert self.api.get("/api/peers").status_code == 301
