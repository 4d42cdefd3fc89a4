"""The one name for a JSON object as the code passes it around (a decoded JSON-RPC message, params, a result)."""

from __future__ import annotations

from typing import Any

JsonDict = dict[str, Any]
