"""The values a forwarded call carries from step to step: what it is about, what was decided, how it ended."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from federation.upstream.base import JsonDict
from identity.call_digest import arguments_hash
from identity.consent.policy import KIND_FOR_METHOD
from mcp_endpoint import jsonrpc
from mcp_endpoint.jsonrpc import JsonRpcError

ARGUMENT_METHODS = frozenset({"tools/call", "prompts/get"})
"""Calls whose arguments are part of what consent decides, so of what the audit row records (as a digest)."""


@dataclass(frozen=True)
class CallSubject:
    """What one call is about, computed once: the method, the tool/prompt/resource name as the peer knows it, and the arguments."""

    method: str
    name: str
    arguments: Any
    """As consent binds them: a resource read has none but its URI (`name`)."""

    @classmethod
    def of(cls, method: str, params: JsonDict) -> CallSubject:
        if method == "completion/complete":
            ref = params.get("ref") if isinstance(params.get("ref"), dict) else {}
            name = ref.get("name") or ref.get("uri")
        else:
            name = params.get("uri") if method == "resources/read" else params.get("name")
        arguments = {} if method == "resources/read" else params.get("arguments") or {}
        return cls(method, name if isinstance(name, str) else "", arguments)

    @property
    def kind(self) -> str | None:
        """The consent kind (tool, prompt, resource), or None for a call consent does not ask about."""
        return KIND_FOR_METHOD.get(self.method)

    @property
    def audited_arguments(self) -> Any:
        """The arguments the audit row digests, or None for methods whose arguments consent does not bind."""
        return self.arguments if self.method in ARGUMENT_METHODS else None


@dataclass(frozen=True)
class Approval:
    """A call as consent approves it: who (user or federated identity, client), peer, kind, name, arguments."""

    who: str
    client_id: str
    peer: str
    kind: str
    name: str
    arguments_hash: str

    @classmethod
    def of(cls, identity: Any, peer: str, kind: str, name: str, arguments: Any) -> Approval:
        who, client_id = ("", "") if identity is None else (identity.subject_key(), identity.client_id)
        return cls(who, client_id, peer, kind, name, arguments_hash(arguments))

    def binding(self, upstream_state: str | None) -> str:
        """Digest of this call and one round's upstream requestState, which a continuation must match."""
        parts = [self.who, self.client_id, self.peer, self.kind, self.name, self.arguments_hash, upstream_state]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Verdict:
    """What consent decided about a call: the audit word, and what happens next.

    Exactly one of three: the call goes on (`params`, maybe `approval`), the host is answered
    now (`answer`, an input_required pointing at the consent page), or the call is refused
    (`refusal`, the host's error).
    """

    word: str = ""
    """The audit word: allow, grant, approved, continued, ask, ask-home, home, deny, denied, timeout, rejected, or "" (nothing to decide)."""
    params: JsonDict | None = None
    answer: JsonDict | None = None
    refusal: JsonRpcError | None = None
    approval: Approval | None = None
    """Set when the user approved this call (now or in an earlier round): further rounds are not asked about."""

    @classmethod
    def refuse(cls, refusal: JsonRpcError, word: str) -> Verdict:
        return cls(word=word, refusal=refusal)

    @property
    def goes_on(self) -> bool:
        return self.answer is None and self.refusal is None


@dataclass(frozen=True)
class Outcome:
    """How one forwarded call ended: its result or its error, and the decision that led there."""

    subject: CallSubject
    decision: str = ""
    result: JsonDict | None = None
    error: BaseException | None = None
    """A JsonRpcError for the host, or what else ended the call (cancellation, a bug): re-raised by `unwrap`."""

    def unwrap(self) -> JsonDict:
        """The result, or raise the error."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    @property
    def error_code(self) -> int | None:
        if self.error is None:
            return None
        if isinstance(self.error, jsonrpc.JsonRpcError):
            return self.error.code
        return jsonrpc.REQUEST_CANCELLED if isinstance(self.error, asyncio.CancelledError) else jsonrpc.INTERNAL_ERROR

    @property
    def input_required(self) -> bool:
        """Nothing ran yet, or not to the end: the host was asked for input (docs/CONSENT.md "Outcomes")."""
        return self.error is None and self.result is not None and self.result.get("resultType") == "input_required"
