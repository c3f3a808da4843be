"""Test-suite settings: state (runs, ledger) in a runtime folder of this session under the state dir
(``$TEELAB_STATE_DIR`` or ``$XDG_STATE_HOME/teelab``), swept if the session is killed; the image cache stays
shared. A failed session's state moves to ``test-failures/`` there, so its VM artifacts can be read."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from harness import paths
from harness.host import runtime

KEPT_FAILURES = 5
_FAILURES = paths.state_dir() / "test-failures"
# Runtime folders (sockets) stay in the outer state dir's rt/, not nested in the session's, to keep socket
# paths short.
os.environ.setdefault(runtime.ENV_RUNTIME, str(runtime.runtime_root()))
_STATE = runtime.runtime_dir("test-session")
os.environ["TEELAB_STATE_DIR"] = str(_STATE)


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == 0:
        runtime.remove_runtime_dir(_STATE)
        return
    _FAILURES.mkdir(parents=True, exist_ok=True)
    kept = _FAILURES / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    shutil.move(_STATE, kept)
    runtime.remove_runtime_dir(_STATE)  # lets its watcher go
    for old in sorted(_FAILURES.iterdir())[:-KEPT_FAILURES]:
        shutil.rmtree(old, ignore_errors=True)
    print(f"\nteelab test state (artifacts of every VM run) kept in {kept}")
