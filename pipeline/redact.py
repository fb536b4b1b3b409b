"""Keep credentials out of everything the pipeline writes or prints: error rows, the manifest, messages, logs.

Credentials reach a run three ways: as ``user:password@`` in a URL, in ``storage_options`` (``key``, ``secret``,
``token``, ``client_kwargs.aws_secret_access_key``, ...) and in environment variables (``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``FSSPEC_S3_SECRET``, ``HF_TOKEN``, ...). Exception texts from storage and HTTP libraries may
quote any of them, so every text that leaves a process goes through :func:`redact` first.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Iterator, Mapping

REDACTED = "***"
# Shorter values are not treated as secrets: no real credential is that short, and replacing a short common
# string ("admin", "test") everywhere would garble the messages it is meant to protect.
MIN_SECRET_CHARS = 8
_SECRET_NAME = re.compile(r"secret|token|password|passwd|credential|private|access_key|account_key|api_key|^key$|"
                          r"connection_string|sas", re.IGNORECASE)
_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def secret_values(
    storage_options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> set[str]:
    """Values of secret-looking settings in ``storage_options`` (nested) and the environment."""
    environ = os.environ if environ is None else environ
    found = set(_secrets_in(storage_options or {}))
    found |= {value for name, value in environ.items() if _SECRET_NAME.search(name)}
    return {value for value in found if len(value) >= MIN_SECRET_CHARS}


def _secrets_in(options: Mapping[str, Any]) -> Iterator[str]:
    for name, value in options.items():
        if isinstance(value, Mapping):
            yield from _secrets_in(value)
        elif isinstance(value, str) and _SECRET_NAME.search(str(name)):
            yield value


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without URL user info, the environment's secrets and ``secrets`` (e.g. from
    :func:`secret_values` of the run's storage options)."""
    text = display_url(text)
    # Longest first, so that a secret containing another is replaced whole.
    for value in sorted(secret_values() | set(secrets), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def display_url(url: str) -> str:
    """``url`` (or any text) without the ``user:password@`` part of the URLs in it, for messages and records."""
    return _URL_USERINFO.sub(r"\1", url)


def storage_error(e: Exception, storage_options: Mapping[str, Any] | None = None) -> str:
    """A storage exception as a message: its type and text, redacted, with a hint when access was denied (S3
    answers a HEAD request it refuses with a bare "Forbidden")."""
    text = redact(f"{type(e).__name__}: {e}", secret_values(storage_options))
    if isinstance(e, PermissionError):
        text += " (access denied: check the storage credentials and the permissions on this location)"
    return text
