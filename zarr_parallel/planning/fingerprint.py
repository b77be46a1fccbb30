"""The one fingerprint function, and the canonical JSON it hashes (plans, requests, sources)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(*parts: str | bytes) -> str:
    """The one fingerprint function: SHA-256 over the parts, hex."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
