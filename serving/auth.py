"""The API key a request presents: one rule for HTTP headers and gRPC metadata."""
from __future__ import annotations

import hmac


def presented_key(x_api_key: str | None, authorization: str | None) -> str:
    """``X-API-Key`` when it is non-empty, else the token of ``Authorization: Bearer TOKEN`` (scheme
    case-insensitive, RFC 7235); an empty X-API-Key a proxy adds does not hide a valid Bearer token."""
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def key_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
