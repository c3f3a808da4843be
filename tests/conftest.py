"""Test-suite settings: state (runs, ledger) in a temp dir per session, made inside ``$TEELAB_STATE_DIR`` when
that is set (so CI keeps a failed session's artifacts with its own); the image cache stays shared."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_PARENT = os.environ.get("TEELAB_STATE_DIR") or None
if _PARENT:
    os.makedirs(_PARENT, exist_ok=True)
_STATE = tempfile.mkdtemp(prefix="teelab-test-state-", dir=_PARENT)
os.environ["TEELAB_STATE_DIR"] = _STATE


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return Path(_STATE)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == 0:
        import shutil

        shutil.rmtree(_STATE, ignore_errors=True)
    else:
        print(f"\nteelab test state (artifacts of every VM run) kept in {_STATE}")
