"""What the consent page tells its user about a prompt beyond `prompts.prompt_summary`.

What the tool does (its catalog description), what "approve and remember" covers (the grant
`prompts.consent_prompt_answer` would create), why a question about a call comes a second time,
and how long the call still waits. Shared by the page (identity/consent/views.py) and its live
feed (identity/consent/consumers.py), so a prompt reads the same rendered or pushed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from identity.consent.policy import REQUEST_KIND_FOR_METHOD
from identity.consent.prompts import timeout_setting
from identity.models import ConsentPrompt

DESCRIPTION_LIMIT = 600
"""Characters of a catalog description shown; an upstream's description can be any length."""
CATALOG_KINDS = ("tool", "resource", "prompt")


def _catalog_entry(prompt: ConsentPrompt) -> Any:
    """This gateway's catalog entry for what the prompt asks about, or None.

    A question another gateway asks (`owner_gateway`) names the item as that gateway does: here
    it is listed under the home `<owner>.<peer>` (federation/naming.py).
    """
    from federation import naming
    from federation.models import CatalogEntry

    if prompt.kind not in CATALOG_KINDS:
        return None
    rows = CatalogEntry.objects.filter(kind=prompt.kind).select_related("peer")
    if prompt.owner_gateway:
        home = f"{prompt.owner_gateway}.{prompt.peer}"
        qualify = naming.qualify_uri if prompt.kind == "resource" else naming.qualify_name
        return rows.filter(name=qualify(home, prompt.name)).first()
    return rows.filter(peer__name=prompt.peer, upstream_name=prompt.name).first()


def _description(entry: Any) -> str:
    text = entry.payload.get("description") if entry is not None and isinstance(entry.payload, dict) else None
    if not isinstance(text, str):
        return ""
    text = text.strip()
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "\u2026"


def _what(prompt: ConsentPrompt) -> str:
    if prompt.kind in REQUEST_KIND_FOR_METHOD.values():
        return f"{prompt.kind} requests during {prompt.name} on {prompt.peer}"
    return f"calls of {prompt.kind} {prompt.name} on {prompt.peer}"


def remember_text(prompt: ConsentPrompt) -> str:
    """Say exactly what "approve and remember" would let through, and where it is kept."""
    application = f"from {prompt.client_name or prompt.client_id}" if prompt.client_id else "from any application"
    if prompt.owner_gateway:
        return (
            f"Approve and remember: gateway {prompt.owner_gateway}, which owns this {prompt.kind}, lets later "
            f"{_what(prompt)} {application} go ahead without asking you, whatever their arguments, for the time you "
            f"choose. {prompt.owner_gateway} keeps it, so it is not listed under Remembered approvals here."
        )
    return (
        f"Approve and remember: later {_what(prompt)} {application} go ahead without asking you, whatever their "
        "arguments, for the time you choose. A policy that denies still wins; revoke it any time under Remembered approvals."
    )


def asked_again(prompt: ConsentPrompt, entry: Any) -> str:
    """Why this question comes, when it is the second one about one call; else ""."""
    gateway = settings.FEDMCP_GATEWAY_NAME
    if not prompt.owner_gateway:
        if entry is not None and entry.peer.is_gateway and prompt.kind in CATALOG_KINDS:
            return f"{prompt.peer} is another gateway: its own policy may ask you about this call once more after you answer."
        return ""
    if entry is None or prompt.user_id is None:
        return ""
    # The question this gateway asked first, for its own policy, about the same call: approved
    # (or the call would not have reached the owner) within one prompt's lifetime before this one.
    since = (prompt.created_at or timezone.now()) - timedelta(seconds=timeout_setting() + 60)
    earlier = ConsentPrompt.objects.filter(
        user_id=prompt.user_id, owner_gateway="", peer=entry.peer.name, kind=prompt.kind, name=entry.upstream_name,
        client_id=prompt.client_id, status=ConsentPrompt.Status.APPROVED, decided_at__gte=since,
    ).exists()
    if not earlier:
        return ""
    return (
        f"Asked again because gateway {prompt.owner_gateway}'s policy asks too: you approved this call for {gateway} "
        f"a moment ago; {prompt.owner_gateway} owns this {prompt.kind} and asks its users itself."
    )


def seconds_left(prompt: ConsentPrompt, now: datetime | None = None) -> int:
    """Whole seconds until the prompt expires (0 once it has)."""
    return max(0, int((prompt.expires_at - (now or timezone.now())).total_seconds()))


def wait_text(seconds: int) -> str:
    """"1 min 05 s" for a countdown that starts without JavaScript."""
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def prompt_display(prompt: ConsentPrompt) -> dict[str, Any]:
    """Return what the page shows of `prompt` besides its summary (see the module docstring)."""
    entry = _catalog_entry(prompt)
    left = seconds_left(prompt)
    return {
        "description": _description(entry),
        "remember_text": remember_text(prompt),
        "asked_again": asked_again(prompt, entry),
        "expires_in": left,
        "expires_in_text": wait_text(left),
        # Shown until the page's script puts it in the browser's time zone (consent/_clock.html).
        "created_text": f"{timezone.localtime(prompt.created_at):%d %b %Y, %H:%M:%S %Z}" if prompt.created_at else "",
    }
