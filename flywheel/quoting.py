"""Quoting a client's value inside an error message, cut short.

A refusal that echoes a whole request field can be larger than gRPC's metadata limit (status
details travel in trailers, 16 KiB at most on the client); the client then gets a transport error
instead of the reason. Every message that names a value the client sent quotes it through here.
"""

from __future__ import annotations

QUOTE_LIMIT = 60


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of ``value``, its middle elided past ``limit`` characters."""
    if len(value) <= limit:
        return repr(value)
    half = limit // 2
    return f"{value[:half]!r}…({len(value)} characters)…{value[-half:]!r}"
