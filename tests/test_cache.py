"""The content-addressed cache: atomic fills, concurrent processes, read-only roots."""

import multiprocessing as mp
import time

import pytest

from bids_llm_encode.cache import Cache, atomic_write_bytes, digest


def test_digest_changes_with_any_part():
    assert digest("a", 1) == digest("a", 1)
    assert digest("a", 1) != digest("a", 2)
    assert digest({"x": 1, "y": 2}) == digest({"y": 2, "x": 1})


def test_fill_once_then_hit(tmp_path):
    cache, calls = Cache(tmp_path), []

    def create(folder):
        calls.append(1)
        (folder / "v.txt").write_text("42")

    a = cache.get_or_create("ns", "k", create)
    b = cache.get_or_create("ns", "k", create)
    assert a == b and (a / "v.txt").read_text() == "42" and len(calls) == 1
    assert cache.has("ns", "k")


def test_failed_fill_leaves_nothing(tmp_path):
    cache = Cache(tmp_path)

    def create(folder):
        (folder / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_create("ns", "k", create)
    assert not cache.has("ns", "k")
    assert [p.name for p in (tmp_path / "ns").iterdir() if not p.name.endswith(".lock")] == []


def _fill(root, log):
    def create(folder):
        with open(log, "a") as f:
            f.write("x")
        time.sleep(0.5)
        (folder / "v.txt").write_text("done")

    return (Cache(root).get_or_create("ns", "same", create) / "v.txt").read_text()


def test_concurrent_processes_compute_once(tmp_path):
    log = tmp_path / "calls.log"
    with mp.get_context("spawn").Pool(4) as pool:
        out = pool.starmap(_fill, [(tmp_path / "c", log)] * 4)
    assert out == ["done"] * 4
    assert log.read_text() == "x"


def test_readonly_root_is_searched_first(tmp_path):
    ro = Cache(tmp_path / "ro")
    ro.get_or_create("ns", "k", lambda d: (d / "v").write_text("prebuilt"))
    rw = Cache(tmp_path / "rw", readonly_roots=[tmp_path / "ro"])
    folder = rw.get_or_create("ns", "k", lambda d: pytest.fail("should not recompute"))
    assert (folder / "v").read_text() == "prebuilt"


def test_atomic_write_bytes(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(p, b"abc")
    assert p.read_bytes() == b"abc"
    assert [x.name for x in p.parent.iterdir()] == ["f.bin"]


def test_cache_root_precedence(tmp_path, monkeypatch):
    from bids_llm_encode.cache import cache_root
    from bids_llm_encode.config import Config

    monkeypatch.setenv("BIDS_LLM_ENCODE_CACHE", str(tmp_path / "env"))
    cfg = Config(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant")
    assert cache_root(cfg) == tmp_path / "env"
    cfg.work_dir = tmp_path / "work"
    assert cache_root(cfg) == tmp_path / "work" / "cache"
    cfg.cache_dir = tmp_path / "explicit"
    assert cache_root(cfg) == tmp_path / "explicit"


def test_digest_of_arrays_uses_their_bytes():
    import numpy as np

    a = np.arange(2000, dtype=np.float64)
    b = a.copy()
    b[1000] = -1.0  # in the middle that str() elides
    assert str(a) == str(b)
    assert digest(a) != digest(b)
    assert digest(a) == digest(a.copy())
    assert digest(a) != digest(a.astype(np.float32)) != digest(a.reshape(40, 50))
    assert digest("x", [1, 2]) == digest("x", [1, 2])  # non-array keys are as before


def test_complete_entry_never_deleted(tmp_path):
    """Another writer completed the entry while the lock did not exclude it: theirs is kept."""
    cache = Cache(tmp_path)
    final = cache.path("ns", "k")

    def create(folder):
        (folder / "v.txt").write_text("mine")
        final.mkdir(parents=True)  # the other writer's complete entry appears meanwhile
        (final / "v.txt").write_text("theirs")
        (final / ".complete").write_text("")

    out = cache.get_or_create("ns", "k", create)
    assert (out / "v.txt").read_text() == "theirs"
    assert [p.name for p in (tmp_path / "ns").iterdir() if not p.name.endswith(".lock")] == ["k"]


def test_incomplete_leftover_replaced(tmp_path):
    cache = Cache(tmp_path)
    final = cache.path("ns", "k")
    final.mkdir(parents=True)
    (final / "half.txt").write_text("crashed")
    out = cache.get_or_create("ns", "k", lambda d: (d / "v.txt").write_text("new"))
    assert sorted(p.name for p in out.iterdir()) == [".complete", "v.txt"]
    assert [p.name for p in (tmp_path / "ns").iterdir() if not p.name.endswith(".lock")] == ["k"]


def test_stale_temporary_folders_removed(tmp_path):
    import os

    from bids_llm_encode.cache import STALE_TMP_AGE_S

    cache = Cache(tmp_path)
    ns = tmp_path / "models"
    old, young = ns / ".abc123.x1y2z3.tmp", ns / ".def456.q9w8e7.tmp"
    for d in (old, young):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"0" * 10)
    os.utime(old, (0, time.time() - STALE_TMP_AGE_S - 60))
    cache.get_or_create("models", "k", lambda d: (d / "v").write_text("1"))
    assert not old.exists() and young.exists()


def test_cache_folders_readable_by_the_group(tmp_path):
    import os
    import stat

    cache = Cache(tmp_path / "c")
    folder = cache.get_or_create("ns", "k", lambda d: (d / "v").write_text("1"))
    from bids_llm_encode.cache import umask

    expected = 0o777 & ~umask()
    assert stat.S_IMODE(os.stat(folder).st_mode) == expected
    assert stat.S_IMODE(os.stat(folder).st_mode) & stat.S_IRGRP


def test_enolck_is_a_clear_error_naming_cache_dir(tmp_path, monkeypatch):
    import errno
    import fcntl

    from bids_llm_encode.errors import EXIT_IO, IOFailure

    def no_lock(fh, op):
        if op == fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_lock)
    with pytest.raises(IOFailure) as info:
        Cache(tmp_path).get_or_create("ns", "k", lambda d: None)
    assert "--cache-dir" in str(info.value) and "ENOLCK" in str(info.value)
    assert info.value.exit_code == EXIT_IO
