"""``teelab kms`` given values it cannot use: a coded error, exit status 2, no traceback, nothing left."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

Run = Callable[..., tuple[int, str, str]]
FILE = "a-file"  # stands for a regular file given as --kms-dir

CASES = {
    "audit --limit 10**30": (["audit", "--limit", str(10**30)], "--limit must be 1..100000"),
    "audit --limit 0": (["audit", "--limit", "0"], "--limit must be 1..100000"),
    "audit --since -1": (["audit", "--since", "-1"], "--since must be a row id"),
    "audit --since 2**63": (["audit", "--since", str(2**63)], "--since must be a row id"),
    "serve --port 99999": (["serve", "--port", "99999"], "port 99999 is outside 0..65535"),
    "serve --port -1": (["serve", "--port", "-1"], "port -1 is outside"),
    "serve --max-body -1": (["serve", "--max-body", "-1"], "max body -1 is outside"),
    "serve --max-body 2**40": (["serve", "--max-body", str(2**40)], "max body 1099511627776 is outside"),
    "serve --max-connections 0": (["serve", "--max-connections", "0"], "max connections 0 is outside"),
    "serve --request-timeout nan": (["serve", "--request-timeout", "nan"], "request timeout nan is outside"),
    "serve --request-timeout 0": (["serve", "--request-timeout", "0"], "request timeout 0.0 is outside"),
    "audit on a missing store": (["audit"], "there is no KMS store"),
    "keys on a missing store": (["keys"], "there is no KMS store"),
    "audit --kms-dir FILE": (["audit"], "is not a directory"),
    "keys --kms-dir FILE": (["keys"], "is not a directory"),
    "credentials --kms-dir FILE": (["credentials"], "is not a directory"),
    "create-key --kms-dir FILE": (["create-key"], "is not a directory"),
    "serve --kms-dir FILE": (["serve", "--port", "0"], "is not a directory"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_values_are_coded_errors_that_leave_nothing(tmp_path: Path, run: Run, case: str) -> None:
    argv, message = CASES[case]
    kms_dir = tmp_path / "kms"
    if "FILE" in case:
        kms_dir = tmp_path / FILE
        kms_dir.write_text("not a KMS\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    status, out, err = run("kms", "--kms-dir", str(kms_dir), *argv)
    assert status == 2, (out, err)
    assert "[ E102 ]" in err and message in err, err
    assert "Traceback" not in out + err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if "FILE" in case:
        assert kms_dir.read_text() == "not a KMS\n"


POLICY_FILES = {
    "not UTF-8": (b"\xff\xfe{}", "E103"),
    "a directory": (None, "E103"),
    "a JSON number": (b"5", "E1008"),
    "a second Effect": (
        b'{"Statement": [{"Effect": "Allow", "Effect": "Deny", "Principal": "*", "Action": "kms:*"}]}',
        "E1008",
    ),
}


@pytest.mark.parametrize("command", ["create-key", "put-policy"])
@pytest.mark.parametrize("case", POLICY_FILES, ids=list(POLICY_FILES))
def test_a_bad_key_policy_file_is_refused_before_a_store_is_made(
    tmp_path: Path, run: Run, case: str, command: str
) -> None:
    content, code = POLICY_FILES[case]
    policy = tmp_path / "policy.json"
    if content is None:
        policy.mkdir()
    else:
        policy.write_bytes(content)
    argv = ["put-policy", "some-key"] if command == "put-policy" else ["create-key"]
    status, out, err = run("kms", "--kms-dir", str(tmp_path / "kms"), *argv, "--policy", str(policy))
    assert status == 2, (out, err)
    assert f"[ {code} ]" in err and "Traceback" not in out + err
    assert not (tmp_path / "kms").exists()


BENCH_CASES = {
    "--hostile 0": ["--hostile", "0"],
    "--hostile with --open-rate 0": ["--hostile", "1000", "--open-rate", "0"],
    "--open-rate -5": ["--open-rate", "-5"],
}


@pytest.mark.parametrize("case", BENCH_CASES, ids=list(BENCH_CASES))
def test_bench_kms_refuses_bad_hostile_values(run: Run, case: str) -> None:
    status, out, err = run("bench", "kms", *BENCH_CASES[case])
    assert status == 2 and "[ E102 ]" in err and "Traceback" not in out + err, (out, err)


def test_python_m_harness_kms_refuses_a_bad_port_the_same_way(tmp_path: Path) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "harness.kms", "--kms-dir", str(tmp_path / "kms"), "--port", "99999"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "[ E102 ]" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
