"""Content digests of dataset files, for the data fingerprint in a record's identity.

A corrected label file of the same byte size must change the identity, so the fingerprint hashes
content, not names and sizes. Hashing a benchmark's files takes seconds; a rerun should not pay
them again, so each file's SHA-256 is kept in ``$PEARL_CACHE/digests/<folder hash>.json`` under
its (size, modification time): a file rewritten in place gets a new time, so it is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

_memory: dict[str, tuple[int, int, str]] = {}  # resolved path → (size, mtime_ns, sha256), this process


def _cache_file(folder: Path) -> Path:
    root = Path(os.environ.get("PEARL_CACHE", Path.home() / ".cache" / "pearl"))
    return root / "digests" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # no cache yet, or a damaged one: hash again
        return {}


def _save(cache: Path, entries: dict) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:  # an unwritable cache only costs the hashing next time
        pass


def content_digests(folder: Path, paths: Iterable[Path]) -> dict[Path, str]:
    """SHA-256 of each file of ``paths`` (all under ``folder``), from the cache where the file's size
    and modification time are those it was hashed with."""
    folder = Path(folder).resolve()
    cache = _cache_file(folder)
    stored = _load(cache)
    changed = False
    digests = {}
    for path in paths:
        stat = path.stat()
        key = str(path.resolve())
        known = _memory.get(key) or stored.get(key)
        if known is None or tuple(known[:2]) != (stat.st_size, stat.st_mtime_ns):
            known = (stat.st_size, stat.st_mtime_ns, _sha256(path))
            stored[key] = list(known)
            changed = True
        _memory[key] = tuple(known)
        digests[path] = known[2]
    if changed:
        _save(cache, stored)
    return digests
