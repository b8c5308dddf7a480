"""Optional bearer-key authentication (``ERC_API_KEYS`` / ``ERC_API_KEYS_FILE``).

Fails closed: keys that are configured but blank, or too short, stop the start with a message
(a templated Secret that rendered empty must not turn authentication off). A keys file is
re-read when it changes, so keys rotate without a restart.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

from service.settings import Settings

log = logging.getLogger("service.security")


class KeyConfigError(ValueError):
    """API keys configured in a way that would not protect anything."""


def _file_keys(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _checked(keys: list[str], source: str, min_length: int) -> tuple[bytes, ...]:
    if not keys:
        raise KeyConfigError(
            f"{source} is set but holds no key; set at least one key, or unset it to turn authentication off"
        )
    short = [i for i, k in enumerate(keys, 1) if len(k) < min_length]
    if short:
        raise KeyConfigError(
            f"{source}: key number {', '.join(map(str, short))} is shorter than {min_length} characters "
            "(ERC_API_KEY_MIN_LENGTH)"
        )
    return tuple(k.encode() for k in keys)


def load_keys(settings: Settings) -> tuple[bytes, ...]:
    """The accepted keys; empty: authentication is off. Keys stay out of logs and reprs."""
    keys: tuple[bytes, ...] = ()
    if settings.api_keys is not None:
        inline = [k.strip() for k in settings.api_keys.get_secret_value().split(",") if k.strip()]
        keys += _checked(inline, "ERC_API_KEYS", settings.api_key_min_length)
    if settings.api_keys_file is not None:
        keys += _checked(
            _file_keys(settings.api_keys_file),
            f"ERC_API_KEYS_FILE ({settings.api_keys_file})",
            settings.api_key_min_length,
        )
    return keys


class KeyRing:
    """The keys in force. With a keys file, a change of its modification time (checked at most
    once a second) reloads it; a reload that fails keeps the keys in force and logs why."""

    def __init__(self, settings: Settings, check_every_s: float = 1.0) -> None:
        self.settings = settings
        self.check_every_s = check_every_s
        self.keys = load_keys(settings)
        self._stamp = self._mtime()
        self._checked_at = time.monotonic()

    def _mtime(self) -> int | None:
        path = self.settings.api_keys_file
        try:
            return os.stat(path).st_mtime_ns if path is not None else None
        except OSError:
            return None

    def current(self) -> tuple[bytes, ...]:
        if self.settings.api_keys_file is not None and time.monotonic() - self._checked_at >= self.check_every_s:
            self._checked_at = time.monotonic()
            stamp = self._mtime()
            if stamp != self._stamp:
                try:
                    self.keys = load_keys(self.settings)
                    self._stamp = stamp
                    log.info("API keys reloaded from %s (%d keys)", self.settings.api_keys_file, len(self.keys))
                except (OSError, KeyConfigError) as exc:
                    log.error("API keys file changed but was not loaded, keeping the keys in force: %s", exc)
        return self.keys

    def authorized(self, header: str | None) -> bool:
        return authorized(header, self.current())


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
