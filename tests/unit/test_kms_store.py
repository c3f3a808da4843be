"""The KMS store forgets replayed-nonce digests once they have expired (the table would otherwise grow for as
long as the KMS is used), and keeps the live ones."""

from __future__ import annotations

import time
from pathlib import Path

from harness.kms.audit_log import AuditRow
from harness.kms.store import Store


def test_purge_drops_expired_nonces_and_keeps_live_ones(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    try:
        for request, digest, expires in (
            ("r1", "expired", time.time() - 1),
            ("r2", "live", time.time() + 600),
        ):
            row = AuditRow(request, "Decrypt", None, None, None, "allow", (), 200, None, time.time())
            store.submit(Store.record(row, (digest, expires))).result()
        store.purge_deleted()
        remaining = {d for (d,) in store._conn().execute("SELECT digest FROM nonces")}
        assert remaining == {"live"}
        assert set(store.live_nonces()) == {"live"}
    finally:
        store.close()
