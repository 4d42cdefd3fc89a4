"""What every user-facing page of the gateway (consent, connect) sends besides its content."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.views.decorators.clickjacking import xframe_options_deny

View = Callable[..., HttpResponse]


def protected_page(csp: str) -> Callable[[View], View]:
    """Login required, never framed (X-Frame-Options and `frame-ancestors`), never cached, with `csp`."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            response = view(request, *args, **kwargs)
            response["Content-Security-Policy"] = csp
            response["Cache-Control"] = "no-store"
            return response

        return login_required(xframe_options_deny(wrapped))

    return decorate
