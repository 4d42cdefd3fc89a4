"""The admin API's OpenAPI schema: the error responses every view really answers.

drf-spectacular documents the success response of each operation. The errors come from DRF
itself (authentication, permissions, parsing, serializer validation, `get_object_or_404`,
pagination), so they are added here, by what the operation has, rather than on every view.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers


class ErrorOutput(serializers.Serializer):
    """DRF's error body: `{"detail": "…"}`."""

    class Meta:
        ref_name = "Error"

    detail = serializers.CharField()


VALIDATION_ERROR: dict[str, Any] = {
    "type": "object",
    "description": "Field name (or `detail`, `non_field_errors`) → a message, a list of messages, or the errors of a nested field.",
    "additionalProperties": {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {}},
            {"type": "object", "additionalProperties": {}},
        ],
    },
}

PAGE_PARAMETERS = [
    OpenApiParameter("page", int, description="Page number, from 1; a page past the end answers 404."),
    OpenApiParameter("page_size", int, description="Items per page (default 50, at most 500)."),
]

UNAUTHENTICATED = OpenApiResponse(ErrorOutput, description="No token, or an unknown, expired or revoked one.")
FORBIDDEN = OpenApiResponse(ErrorOutput, description="The token lacks the `admin` scope (or the user is not staff).")
NOT_FOUND = OpenApiResponse(ErrorOutput, description="No such object, or no such page.")
INVALID = OpenApiResponse(VALIDATION_ERROR, description="The request is malformed or does not fit this gateway; the body says which field and why.")
UNSUPPORTED_MEDIA_TYPE = OpenApiResponse(ErrorOutput, description="The body is not JSON, form data or multipart.")


class AdminApiSchema(AutoSchema):
    """AutoSchema that adds the error statuses an operation can answer, unless a view declares them itself."""

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        for code, response in self.error_responses().items():
            if str(code) not in responses:
                responses[str(code)] = self._get_response_for_code(response, str(code), direction=direction)
        return responses

    def error_responses(self) -> dict[int, OpenApiResponse]:
        errors = {401: UNAUTHENTICATED, 403: FORBIDDEN}
        if self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None:
            errors[400] = INVALID
            errors[415] = UNSUPPORTED_MEDIA_TYPE
        paginated = any(p.get("name") == "page" and p.get("in") == "query" for p in self._get_parameters())
        if "{" in self.path or paginated:
            errors[404] = NOT_FOUND
        return dict(sorted(errors.items()))
