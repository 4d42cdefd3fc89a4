"""The digest a call's arguments are known by: what consent approvals bind and the audit trail records.

One function, so that an approval (mcp_endpoint/pipeline/values.py `Approval`), a remote consent
(identity/consent/remote.py) and an audit row (identity/audit.py) name the same arguments with
the same value, and an auditor can tell which exact call a decision covered.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def arguments_hash(arguments: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of a call's arguments: sorted keys, no spaces."""
    canonical = json.dumps(arguments if arguments is not None else {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
