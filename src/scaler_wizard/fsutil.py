"""One home for the small things every writer needs: the time stamp, hashing a file, making a
rename durable, writing JSON atomically, canonical JSON, checking a name that becomes a path
component.

Readers of a run folder (the cockpit, ``run --resume``, operators) read files while the run
writes them, so every whole-file write is a rename of a finished temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import InputError

_CHUNK = 1 << 20
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def utc_now() -> str:
    """UTC RFC 3339 timestamp with microseconds and a ``Z`` suffix."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8, no NaN: one byte string per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def fsync_dir(path: Path, *, strict: bool = False) -> None:
    """Persist a directory entry (a rename or create inside ``path``). Where the platform
    cannot open or fsync a directory this is a no-op unless ``strict``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any, *, durable: bool = True) -> None:
    """Write JSON to a temporary file, fsync, then rename over ``path`` (readers never see half a file).

    The temporary name is unique per process and thread, so concurrent writers of the same
    file cannot interleave into one temporary file; the last rename wins. ``durable=False``
    skips both fsyncs: the replacement is still atomic for readers, but may be lost (the old
    content survives) in a power cut — right for frequent, low-stakes updates.
    """
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str), durable=durable)


def write_text_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def is_safe_name(value: Any) -> bool:
    """One plain path component: 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit,
    never containing ``..``."""
    return isinstance(value, str) and bool(SAFE_NAME.match(value)) and ".." not in value


def check_name(kind: str, value: Any) -> str:
    """``value`` if it is a safe path component (:func:`is_safe_name`), else an InputError naming
    ``kind`` (run id, snapshot id, pin reason, file name ...)."""
    if not is_safe_name(value):
        raise InputError(
            f"Invalid {kind} {value!r}.",
            hint="Use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'.",
        )
    return value
