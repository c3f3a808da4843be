"""The parent's side of the enclaves' KMS round trip, without a VM: the job server's program and how its
output is read back (each enclave's answer by its CID, a broken answer as ``broken``)."""

from __future__ import annotations

import json
from concurrent.futures import Future

from harness.agent import ExecResult, GuestJob
from harness.enclave import parent_side


def finished(stdout: str) -> GuestJob:
    future: Future[ExecResult] = Future()
    future.set_result(ExecResult(("python3",), 0, stdout.encode(), b""))
    return GuestJob(("python3",), future)


def test_answers_are_read_by_the_cid_that_sent_them_and_a_non_json_answer_is_broken() -> None:
    served = {"outcome": "served", "sha256": "ab" * 32, "tls": True}
    lines = [
        json.dumps({"cid": 19, "answer": "Traceback (most recent call last):\n"}),
        json.dumps({"cid": 18, "answer": json.dumps(served) + "\n"}),
        json.dumps({"cid": 20, "answer": "[1, 2]\n"}),
    ]
    answers = parent_side.unseal_outcomes(finished("\n".join(lines) + "\n"))
    assert answers[18] == served
    assert answers[19] == {"outcome": "broken", "output": "Traceback (most recent call last):\n"}
    assert answers[20]["outcome"] == "broken"
    assert parent_side.unseal_outcomes(finished("")) == {}


def test_the_job_server_program_compiles_and_ends_each_answer_at_a_newline() -> None:
    """It is Python text inside an f-string: its braces and its newline escape must come out right."""
    compile(parent_side._SERVE_JOBS, "serve-jobs", "exec")
    assert f"bind((socket.VMADDR_CID_ANY, {parent_side.JOB_PORT}))" in parent_side._SERVE_JOBS
    assert 'data.endswith(b"\\n")' in parent_side._SERVE_JOBS
