"""Where datasets live: search roots, the user cache, atomic array caching and checked downloads.

Look-up order of roots: the explicit ``data_dir``, ``$PRUNEKIT_DATA`` (several directories may be
separated by ``os.pathsep``), the user cache (``$PRUNEKIT_CACHE``, else ``$XDG_CACHE_HOME/prunekit/data``,
else ``~/.cache/prunekit/data``) and the system directories in :data:`SYSTEM_ROOTS` (Debian's
``/usr/share/datasets``). Downloads go into the user cache; so do the decoded ``.npz`` arrays
(under ``decoded/``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunekit.errors import DatasetNotFoundError

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DOWNLOAD_TIMEOUT",
    "SYSTEM_ROOTS",
    "DownloadError",
    "Root",
    "cache_dir",
    "decoded_cache_path",
    "download_file",
    "downloads_enabled",
    "fingerprint",
    "load_arrays",
    "not_found_error",
    "save_arrays",
    "search_roots",
]

log = logging.getLogger("prunekit.data")

#: System-wide dataset directories searched last (Debian's ``dataset-*`` packages install here).
SYSTEM_ROOTS: list[Path] = [Path("/usr/share/datasets")]
#: Seconds urllib waits for a connection / for each read before giving up.
DOWNLOAD_TIMEOUT = 10.0
#: Bumped whenever the layout of the decoded ``.npz`` cache files changes.
CACHE_FORMAT_VERSION = 1


class DownloadError(Exception):
    """Internal: a download failed; the message is one line (the caller folds it into a user error)."""


@dataclass(frozen=True)
class Root:
    """A directory searched for datasets and why it is searched."""

    path: Path
    origin: str  # "data_dir", "$PRUNEKIT_DATA", "user cache", "system"


def cache_dir() -> Path:
    """The user cache for datasets: ``$PRUNEKIT_CACHE`` or ``$XDG_CACHE_HOME/prunekit/data``."""
    env = os.environ.get("PRUNEKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "prunekit" / "data"


def downloads_enabled() -> bool:
    """False when ``$PRUNEKIT_OFFLINE`` is set to a true value (1, yes, true)."""
    return os.environ.get("PRUNEKIT_OFFLINE", "").strip().lower() not in {"1", "yes", "true", "on"}


def search_roots(data_dir: str | os.PathLike[str] | None = None) -> list[Root]:
    """Every root directory to search, in order, without duplicates (existing or not)."""
    roots: list[Root] = []
    if data_dir is not None and str(data_dir) != "":
        roots.append(Root(Path(data_dir).expanduser(), "data_dir"))
    for part in os.environ.get("PRUNEKIT_DATA", "").split(os.pathsep):
        if part.strip():
            roots.append(Root(Path(part.strip()).expanduser(), "$PRUNEKIT_DATA"))
    roots.append(Root(cache_dir(), "user cache"))
    roots.extend(Root(Path(p), "system") for p in SYSTEM_ROOTS)
    seen: set[str] = set()
    unique = []
    for r in roots:
        key = os.path.abspath(r.path)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


# --------------------------------------------------------------------------- fingerprints / cache


def _stat_items(path: Path) -> Iterable[str]:
    st = path.stat()
    if not path.is_dir():
        yield f"{path.name}:{st.st_size}:{st.st_mtime_ns}"
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        rel = os.path.relpath(dirpath, path)
        for name in sorted(filenames):
            try:
                fst = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            yield f"{rel}/{name}:{fst.st_size}:{fst.st_mtime_ns}"


def fingerprint(sources: Sequence[Path], extra: str = "") -> tuple[str, str]:
    """``(location_hash, state_hash)`` of source files or directory trees.

    The location hash depends only on the resolved paths; the state hash also on every file's
    name, size and modification time (and on ``extra``), so editing a source invalidates the
    decoded cache.
    """
    where = hashlib.sha1()
    state = hashlib.sha1(f"v{CACHE_FORMAT_VERSION}\0{extra}\0".encode())
    for src in sources:
        p = Path(src).resolve()
        where.update(str(p).encode() + b"\0")
        state.update(str(p).encode() + b"\0")
        for item in _stat_items(p):
            state.update(item.encode() + b"\0")
    return where.hexdigest()[:10], state.hexdigest()[:16]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def decoded_cache_path(dataset: str, split: str, fp: tuple[str, str]) -> Path:
    """Cache file for the decoded arrays of ``dataset``/``split`` from sources with fingerprint ``fp``."""
    return cache_dir() / "decoded" / f"{_safe(dataset)}-{split}-{fp[0]}-{fp[1]}.npz"


def save_arrays(path: Path, arrays: dict[str, np.ndarray], *, prune_stale: bool = True) -> bool:
    """Write ``arrays`` to ``path`` (uncompressed ``.npz``) atomically: a temp file then ``os.replace``.

    With ``prune_stale`` older cache files of the same dataset, split and location (differing only in
    the state hash) are deleted. Returns False (and logs a warning) when the cache is not writable.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; the cache is ordinary user data
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("could not write the dataset cache %s (%s); decoding again next time", path, e)
        return False
    if prune_stale:
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for old in path.parent.glob(f"{prefix}*.npz"):
            if old != path and old.name.count("-") == path.name.count("-"):
                old.unlink(missing_ok=True)
    return True


def load_arrays(path: Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray] | None:
    """Load (only ``keys`` of) a cache file written by :func:`save_arrays`; None if missing/unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in (z.files if keys is None else keys)}
    except Exception as e:  # a truncated/corrupt cache file is just a cache miss
        log.warning("ignoring unreadable dataset cache %s (%s)", path, e)
        return None


# --------------------------------------------------------------------------- downloads


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason if reason is not None else exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (atomically), checking ``sha256`` or ``md5`` when given.

    Raises :class:`DownloadError` with a one-line reason on any failure (network, HTTP error,
    timeout, checksum mismatch); never leaves a partial file behind.
    """
    dest = Path(dest)
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    h = hashlib.sha256() if sha256 else hashlib.md5(usedforsecurity=False) if md5 else None
    log.info("downloading %s -> %s", url, dest)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "prunekit"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    if h is not None:
                        h.update(chunk)
        if h is not None:
            want = (sha256 or md5 or "").lower()
            if h.hexdigest() != want:
                raise DownloadError(f"{url}: checksum mismatch (got {h.hexdigest()}, expected {want})")
        os.replace(tmp, dest)
    except DownloadError:
        raise
    except Exception as e:  # urllib/http/socket errors of every kind become one readable line
        raise DownloadError(f"{url}: {_describe(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------- errors


def not_found_error(
    dataset: str,
    split: str,
    looked: Sequence[str],
    *,
    download_note: str,
    howto: Sequence[str],
) -> DatasetNotFoundError:
    """A :class:`DatasetNotFoundError` listing every place searched and how to obtain the data."""
    lines = [f"dataset {dataset!r} ({split} split) was not found. Looked in:"]
    lines += [f"  - {place}" for place in looked]
    if not os.environ.get("PRUNEKIT_DATA"):
        lines.append("  ($PRUNEKIT_DATA is not set)")
    lines.append(download_note)
    lines.append("To get it:")
    lines += [f"  * {h}" for h in howto]
    return DatasetNotFoundError("\n".join(lines))
