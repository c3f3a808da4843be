"""The lifecycle's small parts without a VM: the parent's heartbeat book and CPU knobs, the frames, the
``teelab-enclave`` command line, and the host's image reception."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from teelab_guest import parent_pool, pool_wire, teelab_enclave

from harness.enclave import errors
from harness.enclave.service import _receive_image


def test_a_heartbeat_is_seen_once_armed_and_a_missing_one_times_out() -> None:
    beats = parent_pool.Heartbeats()
    beats.beat(17)
    beats.arm(17)  # arming forgets an older heartbeat of that CID
    assert not beats.wait(17, 0.05)
    threading.Timer(0.05, beats.beat, args=(17,)).start()
    assert beats.wait(17, 5)
    assert not beats.wait(18, 0.05)


def test_cpus_are_offlined_and_onlined_through_sysfs_waiting_for_a_hot_added_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parent_pool, "SYS_CPU", str(tmp_path))
    (tmp_path / "cpu2").mkdir()
    (tmp_path / "cpu2" / "online").write_text("1\n")
    parent_pool.set_online(2, False)
    assert (tmp_path / "cpu2" / "online").read_text() == "0"

    def hot_add() -> None:
        (tmp_path / "cpu3").mkdir()
        (tmp_path / "cpu3" / "online").write_text("0\n")

    threading.Timer(0.1, hot_add).start()
    parent_pool.set_online(3, True, timeout=5)
    assert (tmp_path / "cpu3" / "online").read_text() == "1"
    with pytest.raises(FileNotFoundError):
        parent_pool.set_online(9, True, timeout=0.1)


def test_the_pool_service_answers_unknown_or_broken_orders_with_a_refusal() -> None:
    beats = parent_pool.Heartbeats()
    a, b = socket.socketpair()
    with a, b:
        assert parent_pool._obey({"op": "format-disk"}, beats, a) == {
            "ok": False,
            "error": "unknown op 'format-disk'",
        }
        assert parent_pool._obey({"op": "heartbeat"}, beats, a)["ok"] is False  # no cid
        assert parent_pool._obey({"op": "offline", "cpus": ["x"]}, beats, a)["ok"] is False


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b'{"op": "status"', "closed"),
        (b"[1, 2]\n", "JSON object"),
        (b"x" * (pool_wire.MAX_FRAME + 2), "too long"),
    ],
)
def test_a_frame_is_one_json_object_on_one_bounded_line(data: bytes, problem: str) -> None:
    a, b = socket.socketpair()
    with a, b:
        threading.Thread(target=lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)), daemon=True).start()
        with pytest.raises(ValueError, match=problem):
            pool_wire.read_frame(b)


def test_run_enclave_sends_nitro_clis_options_and_the_image_size(tmp_path: Path) -> None:
    eif = tmp_path / "app.eif"
    eif.write_bytes(b"e" * 1234)
    args = teelab_enclave.parser().parse_args(
        ["run-enclave", "--eif-path", str(eif), "--cpu-ids", "2", "3", "--memory", "256", "--debug-mode"]
    )
    assert teelab_enclave.request_of(args) == {
        "verb": "run-enclave", "cpu_ids": [2, 3], "memory": 256, "debug_mode": True, "eif_size": 1234,
    }  # fmt: skip
    with pytest.raises(SystemExit):
        teelab_enclave.parser().parse_args(["run-enclave", "--eif-path", "x", "--memory", "1", "--cpu-count",
                                            "2", "--cpu-ids", "2"])  # fmt: skip
    with pytest.raises(SystemExit):
        teelab_enclave.parser().parse_args(["terminate-enclave"])  # one of --enclave-id/-name/--all


def _image_over(data: bytes, size: object) -> int:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        return _receive_image(b, size, 64 << 20)


def test_the_host_takes_the_image_whole_into_a_memfd_or_refuses_it() -> None:
    fd = _image_over(b"abc" * 1000, 3000)
    try:
        assert os.pread(fd, 4000, 0) == b"abc" * 1000
    finally:
        os.close(fd)
    for size in (0, -1, True, "3", (64 << 20) + 1):
        with pytest.raises(errors.EifInputInvalid):
            _image_over(b"", size)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(errors.EifTruncated):
        _image_over(b"abc", 10)
    assert len(os.listdir("/proc/self/fd")) == before  # the memfd of a short image is closed
