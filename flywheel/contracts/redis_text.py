"""Redis replies as text, whichever ``decode_responses`` the caller's client was built with."""

from __future__ import annotations


def text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_dict(mapping: dict) -> dict[str, str]:
    return {text(k): text(v) for k, v in mapping.items()}
