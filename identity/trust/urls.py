"""`/.well-known/jwks.json`: the public key peer gateways verify this gateway's assertions with."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.http import require_GET

from identity.trust.signing import jwks


@require_GET
def jwks_view(request: HttpRequest) -> JsonResponse:
    response = JsonResponse(jwks())
    # Peers cache it; a rotated key is picked up on their next refetch.
    response["Cache-Control"] = "public, max-age=300"
    return response


urlpatterns = [path(".well-known/jwks.json", jwks_view, name="jwks")]
