"""What a parent runs for its enclaves' KMS round trip, as a Nitro parent instance does.

``start_kms_proxy``: guest-init's vsock-proxy in the parent, listening on vsock port 8000 for its enclaves and
passing each connection on to the host (CID 2) port 8000 over the parent's own vsock, where the host's
vsock-proxy reaches the KMS. Its allowlist names only that target. TLS runs end to end, enclave to KMS.

``serve_unseal_jobs``: a server in the parent (vsock port 5006) that hands each ``unseal`` enclave its job
(the ciphertext, the KMS CA certificate) and prints its answer with its CID; ``unseal_outcomes`` reads them.
"""

from __future__ import annotations

import base64
import json
import shlex
import time
from typing import Any

from harness.agent import GuestCommandFailed, GuestJob
from harness.enclave.carver import ParentVm

KMS_PORT = 8000  # the enclave's KMS port on its parent, and the host's on CID 2
JOB_PORT = 5006  # the unseal enclave asks its parent for its job here
PROXY_DIR = "/run/teelab-kms-proxy"

# In the parent: accept COUNT (argv[1]) enclaves' connections on JOB_PORT, send each the job (stdin), and
# print one line per enclave: its CID and its answer.
_SERVE_JOBS = f"""
import json, socket, sys, threading
count, job, lock = int(sys.argv[1]), sys.stdin.buffer.read(), threading.Lock()
listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, {JOB_PORT}))
listener.listen(count)

def serve(conn, cid):
    with conn:
        conn.sendall(job)
        data = b""
        while not data.endswith(b"\\n") and (chunk := conn.recv(65536)):
            data += chunk
    with lock:
        print(json.dumps({{"cid": cid, "answer": data.decode(errors="replace")}}), flush=True)

threads = []
for _ in range(count):
    conn, (cid, _) = listener.accept()
    threads.append(threading.Thread(target=serve, args=(conn, cid)))
    threads[-1].start()
for thread in threads:
    thread.join()
"""


def start_kms_proxy(parent: ParentVm, port: int = KMS_PORT, timeout: float = 30.0) -> None:
    """Start the parent's vsock-proxy (``port`` -> host CID 2 ``port``) and wait for its readiness line;
    E602 with its log when it does not come up."""
    agent = parent.boot.agent
    allowlist = f'allowlist:\n  - {{address: "vsock:2", port: {port}}}\n'
    config, logfile = f"{PROXY_DIR}/allowlist.yaml", f"{PROXY_DIR}/proxy.log"
    proxy = shlex.join(
        ["python3", "-m", "teelab_guest.vsock_proxy", "--config", config, str(port), "vsock:2", str(port)]
    )
    # the allowlist from stdin first: a backgrounded list reads /dev/null
    script = (
        f"mkdir -p {PROXY_DIR} && cat > {config} || exit 1; setsid {proxy} > {logfile} 2>&1 < /dev/null &"
    )
    agent.exec(["sh", "-c", script], stdin=allowlist.encode(), check=True)
    deadline, log = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        log = agent.exec(["cat", logfile]).text
        if "vsock-proxy: port" in log:
            return
        if "refused" in log or "bad allowlist" in log:
            break
        time.sleep(0.1)
    raise GuestCommandFailed(
        f"the vsock-proxy in {parent.name} did not start: {log.strip()[-300:] or 'no output'}",
        hint=f"read the proxy's log in the parent ({logfile})",
        returncode=1,
        stdout=log[-2000:],
    )


def serve_unseal_jobs(
    parent: ParentVm, ciphertext: bytes, kms_ca_pem: str, count: int = 1, timeout: float = 180.0
) -> GuestJob:
    """Listen in the parent for ``count`` ``unseal`` enclaves and hand each the same job; start this before
    the carves. ``unseal_outcomes`` reads their answers."""
    job = {"ciphertext": base64.b64encode(ciphertext).decode(), "kms_ca": kms_ca_pem}
    line = json.dumps(job).encode() + b"\n"
    return parent.boot.agent.start(["python3", "-c", _SERVE_JOBS, str(count)], stdin=line, timeout=timeout)


def unseal_outcomes(job: GuestJob, timeout: float = 180.0) -> dict[int, dict[str, Any]]:
    """Each enclave's answer by its CID: ``{"outcome": "served", "sha256": ...}`` or ``refused``/
    ``untrusted``/..., ``{"outcome": "broken", ...}`` for an answer that is not JSON."""
    answers: dict[int, dict[str, Any]] = {}
    for line in job.result(timeout).text.splitlines():
        reply = json.loads(line)
        try:
            answer = json.loads(reply["answer"])
        except ValueError:
            answer = None
        ok = isinstance(answer, dict)
        answers[int(reply["cid"])] = answer if ok else {"outcome": "broken", "output": reply["answer"][-500:]}
    return answers
