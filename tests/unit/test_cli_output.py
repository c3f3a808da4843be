"""What people read fits an 80-column terminal and survives a pipe: every command's --help, and a sample of
outputs, with no line wider than the terminal and no value cut short."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from harness import cli

COLUMNS = 80
ELLIPSIS = "\N{HORIZONTAL ELLIPSIS}"


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from command_paths(child, (*prefix, name))


PATHS = list(command_paths(cli.build_parser()))


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) or "teelab" for p in PATHS])
def test_help_fits_80_columns(
    path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(COLUMNS))
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([*path, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: teelab {' '.join(path)}".rstrip())
    assert [line for line in text.splitlines() if len(line) > COLUMNS] == []
    if path:
        assert text.split("\n\n")[1].strip(), "every command says what it does under its usage line"


def piped(*args: str) -> str:
    env = {**os.environ, "COLUMNS": str(COLUMNS)}
    env.pop("FORCE_COLOR", None)
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout


@pytest.mark.parametrize(
    "args", [("doctor",), ("image", "ls"), ("tee", "status"), ("explain",), ("attest", "roots")]
)
def test_outputs_fit_a_pipe_at_80_columns(args: tuple[str, ...]) -> None:
    text = piped(*args)
    assert text.strip()
    assert [line for line in text.splitlines() if len(line) > COLUMNS] == []
    assert ELLIPSIS not in text, "a value was cut short"


def test_bare_teelab_lists_the_commands_and_version_answers(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    listing = capsys.readouterr().out
    for command in ("doctor", "demo", "kms", "enclave", "bench", "explain"):
        assert command in listing
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("teelab ")


def test_kms_audit_through_a_pipe_is_a_block_per_record(tmp_path) -> None:
    """Piped at 80 columns, each audit record is a few lines with its values whole (a table folded them)."""
    from teelab_guest.kms_client import KmsCallError, KmsClient, Transport

    from harness.kms import KmsServer

    with KmsServer.start(tmp_path / "kms") as server:
        creds = server.credentials("ops")
        port = int(server.endpoint.rsplit(":", 1)[1])
        transport = Transport.tcp("127.0.0.1", port)
        with KmsClient(transport, access_key=creds.access_key, secret=creds.secret) as client:
            key_id = client.call("CreateKey", {"Description": "audit"})["KeyMetadata"]["KeyId"]
            with pytest.raises(KmsCallError):
                client.call("DescribeKey", {"KeyId": "no-such-key"})
    text = piped("kms", "--kms-dir", str(tmp_path / "kms"), "audit")
    assert [line for line in text.splitlines() if len(line) > COLUMNS] == []
    assert key_id in text and "CreateKey" in text and "DescribeKey" in text
    assert "NotFoundException: key 'no-such-key' does not exist" in text
