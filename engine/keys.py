"""Secrets generated once into the data directory: the cluster token, the cookie key,
the volunteer signing key. Never in the repository, never logged."""

from __future__ import annotations

import os
import secrets

from engine.settings import Settings


def data_secret(settings: Settings, name: str) -> str:
    """The secret ``<data_dir>/secrets/<name>``, created on first use (64 hex digits, mode 0600)."""
    path = settings.data_path / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it a moment ago: use theirs
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
    return path.read_text().strip()


def replace_secret(settings: Settings, name: str) -> str:
    """Replace ``<data_dir>/secrets/<name>`` with a new random value (atomically, mode 0600)."""
    path = settings.data_path / "secrets" / name
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fresh = path.with_name(f".{name}.{secrets.token_hex(4)}")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    value = secrets.token_hex(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    os.replace(fresh, path)
    return value
