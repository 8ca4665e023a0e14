"""Shared fixtures.

- ``narratives``: the real Narratives metadata in ../shared/fixtures (skips when absent).
- A session-wide cache folder (``BIDS_LLM_ENCODE_CACHE``), so that the embedded
  model is de-quantized once per test session, never in the user's home.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures" / "narratives"


@pytest.fixture(scope="session")
def narratives() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"real Narratives fixtures not found at {SHARED_FIXTURES} (../shared is absent)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """One cache for the whole session; tests that need isolation make their own."""
    path = Path(os.environ.get("BIDS_LLM_ENCODE_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    path.mkdir(parents=True, exist_ok=True)  # a folder named in the environment may not exist yet
    old = os.environ.get("BIDS_LLM_ENCODE_CACHE")
    os.environ["BIDS_LLM_ENCODE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("BIDS_LLM_ENCODE_CACHE", None)
    else:
        os.environ["BIDS_LLM_ENCODE_CACHE"] = old


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium for the report tests (``.ci/run`` installs Debian's chromium)."""
    from browser import find_chromium

    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found (.ci/run installs Debian's chromium)")
    return exe
