"""Cache-file helpers: content keys, fingerprints, atomic writes and the one-line rebuild messages."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any


def sha(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def key(fingerprint: dict[str, Any]) -> str:
    return sha(json.dumps(fingerprint, sort_keys=True))[:16]


@lru_cache(maxsize=16)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_id(path: str) -> str:
    st = os.stat(path)
    return _file_sha(path, st.st_size, st.st_mtime_ns)


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write through ``write(file)`` to a temporary file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users of the checkout
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, ensure_ascii=False), binary=False)


def say(message: str) -> None:
    print(f"[corpus] {message}", flush=True)


def read_cache(path: Path, what: str, read: Callable[[Path], Any]) -> Any | None:
    """``read(path)`` or None after one line saying why the cache cannot be used.

    ``read`` raises ``_Stale`` when the file is intact but was built from something else; any other
    exception means the file is unreadable (truncated, corrupt) and is reported as such.
    """
    if not path.exists():
        say(f"building {what}: no cache at {path}")
        return None
    try:
        return read(path)
    except _Stale as e:
        say(f"rebuilding {what}: cache {path} is stale ({e})")
    except Exception as e:  # noqa: BLE001 - any failure to read a cache means "rebuild it"
        say(f"rebuilding {what}: cache {path} is unreadable ({type(e).__name__}: {e})")
    return None


class _Stale(Exception):
    pass


def check_fingerprint(found: Any, expected: dict[str, Any]) -> None:
    if found != expected:
        changed = sorted(
            k for k in set(expected) | set(found or {}) if (found or {}).get(k) != expected.get(k)
        )
        raise _Stale(f"fingerprint differs in {', '.join(changed) or 'format'}")
