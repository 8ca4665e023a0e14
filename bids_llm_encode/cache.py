"""A content-addressed cache for results that do not depend on a participant.

Read-only roots (``$BIDS_LLM_ENCODE_PREBUILT``, colon-separated) are searched
first: a container image carries its prepared models there, while the run
writes new entries to its own writable root.

Keys are SHA-256 digests of the inputs that determine a result (story content,
model identity, settings, package version). Values are folders written under a
temporary name and renamed into place, so a reader never sees half a result and
several processes may fill the cache at once: the first rename wins and the
others drop their copy. An advisory lock per key keeps concurrent processes from
computing the same entry twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from .errors import CantCreateError

log = logging.getLogger(__name__)


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


def digest(*parts: Any) -> str:
    """Stable SHA-256 hex digest of JSON-serialisable parts (plus this package's version)."""
    h = hashlib.sha256()
    h.update(__version__.encode())
    for p in parts:
        h.update(b"\0")
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``) on ``path``, held for the ``with`` block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
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
            self.root.mkdir(parents=True, exist_ok=True)
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
        final.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(final.parent / f".{key}.lock"):
            if (final / ".complete").exists():
                log.debug("cache hit %s/%s (filled by another process)", namespace, key[:12])
                return final
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}.", suffix=".tmp"))
            try:
                create(tmp)
                (tmp / ".complete").write_text("")
                if final.exists():  # an incomplete leftover of a crashed run
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.debug("cache fill %s/%s", namespace, key[:12])
        return final
