"""What the consent page shows of an upstream's sampling or elicitation request.

`request_summary` turns the request's params into a small, bounded, display-only dict: each
message's role and the text of its content (images and audio are named by type and size, never
shown), the system prompt, maxTokens and model preferences; for elicitation the message and the
requested schema. The pages escape all of it; long text is kept (up to a cap) and folded there.

`source_text` says where a request left to this gateway by one further along comes from, as far
as this gateway vouches for it (identity/consent/deferral.py).
"""

from __future__ import annotations

import json
from typing import Any

TEXT_LIMIT = 20_000
"""Characters of one text kept for the page; beyond it the text is cut with a note."""
MAX_MESSAGES = 100
MAX_BLOCKS = 50


def _clip(value: Any, limit: int = TEXT_LIMIT) -> str:
    text = value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > limit:
        return text[:limit] + f"\n… [{len(text) - limit} more characters not kept]"
    return text


def _binary_size(data: Any) -> int:
    """The decoded size of base64 `data`, roughly."""
    return len(data) * 3 // 4 if isinstance(data, str) else 0


def _block(block: Any) -> dict[str, Any]:
    """One content block, as the page shows it: text, or a note of what it is."""
    if not isinstance(block, dict):
        return {"type": "unknown", "note": "content the gateway does not understand"}
    kind = block.get("type") if isinstance(block.get("type"), str) else "unknown"
    if kind == "text":
        return {"type": "text", "text": _clip(block.get("text"))}
    if kind in ("image", "audio"):
        mime = str(block.get("mimeType") or "unknown type")[:100]
        return {"type": kind, "note": f"{kind} ({mime}, {_binary_size(block.get('data')):,} bytes), not shown"}
    if kind == "tool_use":
        return {"type": kind, "note": f"tool use: {str(block.get('name', ''))[:200]}", "text": _clip(block.get("input"))}
    if kind == "tool_result":
        inner = block.get("content") if isinstance(block.get("content"), list) else []
        texts = [b.get("text") for b in inner if isinstance(b, dict) and isinstance(b.get("text"), str)]
        return {"type": kind, "note": "tool result", "text": _clip("\n".join(texts))}
    if kind == "resource":
        resource = block.get("resource") if isinstance(block.get("resource"), dict) else {}
        uri = str(resource.get("uri", ""))[:500]
        if isinstance(resource.get("text"), str):
            return {"type": kind, "note": f"embedded resource {uri}", "text": _clip(resource["text"])}
        return {"type": kind, "note": f"embedded resource {uri} (binary, {_binary_size(resource.get('blob')):,} bytes), not shown"}
    if kind == "resource_link":
        return {"type": kind, "note": f"link to resource {str(block.get('uri', ''))[:500]}"}
    return {"type": kind[:50], "note": f"{kind[:50]} content, not shown"}


def _message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        return {"role": "?", "content": [_block(None)]}
    content = message.get("content")
    blocks = content if isinstance(content, list) else [content]
    role = message.get("role") if isinstance(message.get("role"), str) else "?"
    return {"role": role[:20], "content": [_block(b) for b in blocks[:MAX_BLOCKS]]}


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _model_preferences(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {}
    hints = value.get("hints") if isinstance(value.get("hints"), list) else []
    shown: dict[str, Any] = {
        "hints": [str(h.get("name"))[:200] for h in hints[:20] if isinstance(h, dict) and h.get("name")],
    }
    for key in ("costPriority", "speedPriority", "intelligencePriority"):
        if _number(value.get(key)) is not None:
            shown[key] = value[key]
    return shown


def request_summary(method: str, params: Any) -> dict[str, Any]:
    """Return what the consent page shows of an upstream's `method` request with `params`."""
    params = params if isinstance(params, dict) else {}
    if method == "sampling/createMessage":
        messages = params.get("messages") if isinstance(params.get("messages"), list) else []
        tools = params.get("tools") if isinstance(params.get("tools"), list) else []
        summary: dict[str, Any] = {
            "method": method,
            "messages": [_message(m) for m in messages[:MAX_MESSAGES]],
            "omitted_messages": max(0, len(messages) - MAX_MESSAGES),
            "systemPrompt": _clip(params.get("systemPrompt")) if params.get("systemPrompt") else "",
            "maxTokens": _number(params.get("maxTokens")),
            "modelPreferences": _model_preferences(params.get("modelPreferences")),
            "includeContext": str(params.get("includeContext") or "")[:40],
            "temperature": _number(params.get("temperature")),
            "tools": [str(t.get("name"))[:200] for t in tools[:50] if isinstance(t, dict)],
        }
        return summary
    schema = params.get("requestedSchema")
    return {
        "method": method,
        "mode": str(params.get("mode") or "form")[:20],
        "message": _clip(params.get("message")),
        "url": str(params.get("url") or "")[:2000],
        "requestedSchema": _clip(json.dumps(schema, indent=2, ensure_ascii=False)) if schema is not None else "",
    }


def source_text(source: dict[str, Any]) -> str:
    """Say where a deferred request comes from, and who vouches for that (`ConsentPrompt.deferred_by`)."""
    gateway = source.get("gateway", "")
    what = f"server '{source['server']}' of gateway '{gateway}'" if source.get("server") else f"gateway '{gateway}'"
    vouched = source.get("vouched")
    if vouched == "peer":
        return f"{what}, the peer gateway this call went to"
    if vouched == "signature":
        return f"{what} ({source.get('issuer', '')}, signature verified), through peer gateway '{source.get('via_peer', '')}'"
    return f"{what}, as reported by peer gateway '{source.get('via_peer', '')}' (not verified: {source.get('note', '')})"
