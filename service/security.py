"""Optional bearer-key authentication (``ERC_API_KEYS`` / ``ERC_API_KEYS_FILE``)."""

from __future__ import annotations

import hmac

from service.settings import Settings


def load_keys(settings: Settings) -> tuple[bytes, ...]:
    """The accepted keys; empty: authentication is off. Keys stay out of logs and reprs."""
    keys: list[str] = []
    if settings.api_keys is not None:
        keys += settings.api_keys.get_secret_value().split(",")
    if settings.api_keys_file is not None:
        keys += settings.api_keys_file.read_text(encoding="utf-8").splitlines()
    return tuple(k.strip().encode() for k in keys if k.strip())


def authorized(header: str | None, keys: tuple[bytes, ...]) -> bool:
    """``Authorization: Bearer KEY`` against every key in constant time (no early exit that
    would tell how many keys there are or which one nearly matched)."""
    if not keys:
        return True
    scheme, _, token = (header or "").partition(" ")
    candidate = token.strip().encode() if scheme.lower() == "bearer" else b""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched and bool(candidate)
