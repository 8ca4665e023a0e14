"""A content-addressed cache for results that do not depend on a participant.

Read-only roots (``$BIDS_LLM_ENCODE_PREBUILT``, colon-separated) are searched
first: a container image carries its prepared models there, while the run
writes new entries to its own writable root.

Keys are SHA-256 digests of the inputs that determine a result (story content,
model identity, settings, package version). Values are folders written under a
temporary name (``.<key>.<random>.tmp``) and renamed into place, so a reader
never sees half a result and several processes may fill the cache at once: the
first complete entry wins, and a complete entry is never deleted or replaced
(a later writer drops its copy). An advisory lock per key keeps concurrent
processes from computing the same entry twice. Temporary folders older than
:data:`STALE_TMP_AGE_S` (24 h: left by a killed run) are removed when an entry
of the same namespace is filled. Folders are made ``0777 & ~umask`` (readable
by the group with the usual umask 022 or 002; ``mkdtemp`` alone gives 0700).

Array arguments of :func:`digest` are hashed by dtype, shape and bytes (their
``str`` elides the middle of large arrays, so two arrays could share a key).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from . import __version__
from .errors import CantCreateError, IOFailure

log = logging.getLogger(__name__)

#: Age (s) after which a temporary cache folder (``.<key>.<random>.tmp``) is a leftover: 24 h.
STALE_TMP_AGE_S = 24 * 3600

_TMP_RE = re.compile(r"^\.[0-9a-zA-Z_.-]+\.tmp$")

#: errno values of a file system that cannot lock (NFS without lockd, some FUSE mounts).
_NO_LOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}

_UMASK: Optional[int] = None


def umask() -> int:
    """The process umask, read once (from /proc when possible: ``os.umask`` sets it while reading)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status") as fh:
                line = next(ln for ln in fh if ln.startswith("Umask:"))
            _UMASK = int(line.split()[1], 8)
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def default_cache_dir() -> Path:
    """``$BIDS_LLM_ENCODE_CACHE``, else ``$XDG_CACHE_HOME/bids_llm_encode``, else ``~/.cache/bids_llm_encode``."""
    env = os.environ.get("BIDS_LLM_ENCODE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bids_llm_encode"


def cache_root(config) -> Path:
    """The run's cache: ``--cache-dir``, else ``<--work-dir>/cache``, else :func:`default_cache_dir`."""
    if config.cache_dir is not None:
        return Path(config.cache_dir)
    if config.work_dir is not None:
        return Path(config.work_dir) / "cache"
    return default_cache_dir()


def _digest_default(obj: Any) -> Any:
    """numpy arrays by dtype, shape and the SHA-256 of their bytes; anything else by ``str``."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return str(obj)
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        if a.dtype == object:
            return {"__ndarray__": "object", "shape": list(a.shape), "items": [str(x) for x in a.ravel()]}
        return {"__ndarray__": a.dtype.str, "shape": list(a.shape),
                "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
    return str(obj)


def digest(*parts: Any) -> str:
    """Stable SHA-256 hex digest of JSON-serialisable parts (plus this package's version).

    numpy arrays count by dtype, shape and bytes; other objects by ``str``.
    """
    h = hashlib.sha256()
    h.update(__version__.encode())
    for p in parts:
        h.update(b"\0")
        h.update(json.dumps(p, sort_keys=True, default=_digest_default).encode())
    return h.hexdigest()


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: Path, advice: str = "") -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``) on ``path``, held for the ``with`` block.

    Raises
    ------
    IOFailure (74)
        The file system cannot lock (``ENOLCK``, ``EOPNOTSUPP``); ``advice`` says
        what to do (e.g. give a local ``--cache-dir``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno in _NO_LOCK:
                raise IOFailure(f"cannot lock {path}: {exc.strerror or exc} (errno {errno.errorcode.get(exc.errno, exc.errno)}): "
                                f"its file system does not support fcntl locks (e.g. NFS without lockd). "
                                f"{advice or 'Use a folder on a local disk.'}") from None
            raise
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Cache:
    """Folders of results under ``root/<namespace>/<key>/``.

    Examples
    --------
    >>> cache = Cache(tmp)                                        # doctest: +SKIP
    >>> folder = cache.get_or_create("words", key, lambda d: np.save(d / "x.npy", x))  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, readonly_roots: list[str | os.PathLike] | None = None):
        self.root = Path(root)
        if readonly_roots is None:  # e.g. models prepared when a container image was built
            env = os.environ.get("BIDS_LLM_ENCODE_PREBUILT", "")
            readonly_roots = [p for p in env.split(os.pathsep) if p]
        self.readonly_roots = [Path(p) for p in readonly_roots]
        try:
            self.root.mkdir(parents=True, exist_ok=True)  # mode 0777 & ~umask
        except OSError as exc:
            raise CantCreateError(
                f"cannot create the cache folder {self.root}: {exc}. "
                "Give a writable folder with --cache-dir."
            ) from exc

    def path(self, namespace: str, key: str) -> Path:
        return self.root / namespace / key

    def has(self, namespace: str, key: str) -> bool:
        roots = [*self.readonly_roots, self.root]
        return any((r / namespace / key / ".complete").exists() for r in roots)

    def get_or_create(self, namespace: str, key: str, create: Callable[[Path], Any]) -> Path:
        """Return the folder for ``key``, calling ``create(tmp_folder)`` to fill it when absent.

        ``create`` writes its files into the folder it is given; the folder is
        renamed into place only when ``create`` returns without error.
        """
        for ro in self.readonly_roots:
            if (ro / namespace / key / ".complete").exists():
                return ro / namespace / key
        final = self.path(namespace, key)
        if (final / ".complete").exists():
            log.debug("cache hit %s/%s", namespace, key[:12])
            return final
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CantCreateError(f"cannot create the cache folder {final.parent}: {exc.strerror or exc}. "
                                  "Give a writable folder with --cache-dir.") from exc
        self.remove_stale(namespace)
        with file_lock(final.parent / f".{key}.lock",
                       advice=f"Give a cache folder on a local disk with --cache-dir (now {self.root})."):
            if (final / ".complete").exists():
                log.debug("cache hit %s/%s (filled by another process)", namespace, key[:12])
                return final
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}.", suffix=".tmp"))
            try:
                os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: others could not read the entry
                create(tmp)
                (tmp / ".complete").write_text("")
                self._install(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.debug("cache fill %s/%s", namespace, key[:12])
        return final

    @staticmethod
    def _install(tmp: Path, final: Path) -> None:
        """Rename ``tmp`` to ``final``; a complete ``final`` (another writer's) wins and is kept."""
        if final.exists():
            if (final / ".complete").exists():  # the lock did not exclude another writer: keep theirs
                log.debug("cache entry %s was completed by another process; keeping it", final)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            # an incomplete leftover (no .complete): move it aside, then remove it
            aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
            try:
                os.replace(final, aside / "old")
            except FileNotFoundError:
                pass
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and (final / ".complete").exists():
                shutil.rmtree(tmp, ignore_errors=True)  # filled meanwhile by another writer
                return
            raise

    def remove_stale(self, namespace: str, older_than_s: float = STALE_TMP_AGE_S) -> list[Path]:
        """Remove temporary folders (``.<key>.<random>.tmp``) of ``namespace`` older than ``older_than_s``.

        They are left by a run killed while filling an entry (a half de-quantized
        model is 655 MB). Younger ones may belong to a run filling them now.
        """
        folder = self.root / namespace
        removed = []
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return removed
        now = time.time()
        for e in entries:
            if not (_TMP_RE.match(e.name) and e.is_dir(follow_symlinks=False)):
                continue
            try:
                if now - e.stat(follow_symlinks=False).st_mtime < older_than_s:
                    continue
            except OSError:
                continue
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(Path(e.path))
        if removed:
            log.warning("cache %s: removed %d temporary folder(s) left by interrupted runs (older than "
                        "%.0f h)", folder, len(removed), older_than_s / 3600)
        return removed
