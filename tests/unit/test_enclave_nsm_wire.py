"""The NSM wire format shared by guest and host: serde_cbor's exact bytes, round trips, errors, and the
guest's own Python (Debian's 3.11 with python3-cbor2)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cbor2
import pytest
from teelab_guest import nsm_wire as wire
from teelab_guest.nsm_wire import ErrorCode, NsmError

from harness.enclave.nsm import SecurityModule

GUEST_INIT = Path(__file__).parents[2] / "guest-init"


def text(s: str) -> str:
    """CBOR text string head + UTF-8, as hex (lengths < 24)."""
    return f"{0x60 + len(s):02x}" + s.encode().hex()


# Request bytes as serde_cbor writes aws-nitro-enclaves-nsm-api's Request enum, spelled out by hand.
SERDE_REQUESTS = {
    "describe_pcr(0)": (wire.describe_pcr(0), "a1" + text("DescribePCR") + "a1" + text("index") + "00"),
    "describe_pcr(31)": (wire.describe_pcr(31), "a1" + text("DescribePCR") + "a1" + text("index") + "181f"),
    "extend_pcr(16, ab)": (
        wire.extend_pcr(16, b"\xab"),
        "a1" + text("ExtendPCR") + "a2" + text("index") + "10" + text("data") + "41ab",
    ),
    "lock_pcr(20)": (wire.lock_pcr(20), "a1" + text("LockPCR") + "a1" + text("index") + "14"),
    "lock_pcrs(16)": (wire.lock_pcrs(16), "a1" + text("LockPCRs") + "a1" + text("range") + "10"),
    "describe_nsm()": (wire.describe_nsm(), text("DescribeNSM")),
    "get_random()": (wire.get_random(), text("GetRandom")),
    "attestation()": (
        wire.attestation(),
        "a1"
        + text("Attestation")
        + "a3"
        + text("user_data")
        + "f6"
        + text("nonce")
        + "f6"
        + text("public_key")
        + "f6",
    ),
    "attestation(nonce=01)": (
        wire.attestation(nonce=b"\x01"),
        "a1"
        + text("Attestation")
        + "a3"
        + text("user_data")
        + "f6"
        + text("nonce")
        + "4101"
        + text("public_key")
        + "f6",
    ),
}


@pytest.mark.parametrize("name", list(SERDE_REQUESTS))
def test_requests_are_the_bytes_the_nsm_library_sends(name: str) -> None:
    encoded, expected = SERDE_REQUESTS[name]
    assert encoded.hex() == expected


def test_error_responses_are_the_bytes_the_nsm_library_reads() -> None:
    assert wire.error_response(ErrorCode.INVALID_INDEX).hex() == "a1" + text("Error") + text("InvalidIndex")
    assert wire.lock_pcr_response().hex() == text("LockPCR")


def test_every_host_response_decodes_on_the_guest_side() -> None:
    pairs = [
        (wire.describe_pcr_response(lock=True, data=b"p" * 48), wire.DescribePcrResponse(True, b"p" * 48)),
        (wire.extend_pcr_response(data=b"e" * 48), wire.ExtendPcrResponse(b"e" * 48)),
        (wire.lock_pcr_response(), wire.LockPcrResponse()),
        (wire.lock_pcrs_response(), wire.LockPcrsResponse()),
        (
            wire.describe_nsm_response(version=(1, 2, 3), module_id="m", max_pcrs=32, locked_pcrs=[3, 1, 2]),
            wire.DescribeNsmResponse(1, 2, 3, "m", 32, (1, 2, 3), "SHA384"),
        ),
        (wire.attestation_response(document=b"cose"), wire.AttestationResponse(b"cose")),
        (wire.get_random_response(random=b"r" * 256), wire.GetRandomResponse(b"r" * 256)),
    ]
    for encoded, decoded in pairs:
        assert wire.decode_response(encoded) == decoded


def test_every_guest_request_parses_on_the_host_side() -> None:
    assert wire.parse_request(wire.describe_pcr(7)) == wire.DescribePcrRequest(7)
    assert wire.parse_request(wire.extend_pcr(16, b"d")) == wire.ExtendPcrRequest(16, b"d")
    assert wire.parse_request(wire.lock_pcr(17)) == wire.LockPcrRequest(17)
    assert wire.parse_request(wire.lock_pcrs(18)) == wire.LockPcrsRequest(18)
    assert wire.parse_request(wire.describe_nsm()) == wire.DescribeNsmRequest()
    assert wire.parse_request(wire.get_random()) == wire.GetRandomRequest()
    assert wire.parse_request(wire.attestation(user_data=b"u", public_key=b"k")) == wire.AttestationRequest(
        b"u", None, b"k"
    )


@pytest.mark.parametrize("code", list(ErrorCode))
def test_an_error_response_raises_its_code(code: ErrorCode) -> None:
    with pytest.raises(NsmError) as raised:
        wire.decode_response(wire.error_response(code))
    assert raised.value.code is code and code.value in str(raised.value)


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"\xff",
        cbor2.dumps({"Error": "Nope"}),
        cbor2.dumps(7),
        cbor2.dumps({"DescribePCR": {"lock": 1, "data": b""}}),
        cbor2.dumps({"DescribePCR": {"data": b""}}),
        cbor2.dumps("DescribeNSM"),
        cbor2.dumps({"LockPCR": {}}),
        cbor2.dumps({"Reboot": {}}),
        cbor2.dumps("LockPCR") + b"\x00",
    ],
)
def test_a_malformed_response_is_an_invalid_response(response: bytes) -> None:
    with pytest.raises(NsmError) as raised:
        wire.decode_response(response)
    assert raised.value.code is ErrorCode.INVALID_RESPONSE


def test_a_response_to_another_request_is_an_invalid_response() -> None:
    with pytest.raises(NsmError, match="expected a DescribePCR"):
        wire.decode_response(wire.lock_pcr_response(), expect=wire.Operation.DESCRIBE_PCR)
    assert wire.decode_response(wire.lock_pcr_response(), expect="LockPCR") == wire.LockPcrResponse()


def test_the_client_refuses_requests_the_driver_would_refuse() -> None:
    with pytest.raises(NsmError) as raised:
        wire.extend_pcr(16, b"x" * 5000)
    assert raised.value.code is ErrorCode.INPUT_TOO_LARGE
    for bad in (-1, 65536, True, "1"):
        with pytest.raises(ValueError):
            wire.describe_pcr(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        wire.attestation(nonce="text")  # type: ignore[arg-type]


def test_the_host_module_speaks_the_guest_wire() -> None:
    module = SecurityModule({0: b"\x01" * 48}, debug=False, issue_document=lambda **_: b"doc", module_id="m")
    assert (
        wire.decode_response(module.handle(wire.describe_pcr(0)), expect="DescribePCR").data == b"\x01" * 48
    )
    assert wire.decode_response(module.handle(wire.attestation()), expect="Attestation").document == b"doc"


GUEST_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import cbor2
from teelab_guest import nsm_wire as w
requests = [w.describe_pcr(0), w.extend_pcr(16, b"d"), w.lock_pcr(17), w.lock_pcrs(18), w.describe_nsm(),
            w.attestation(user_data=b"u", nonce=None, public_key=b"k"), w.get_random()]
responses = [w.decode_response(bytes.fromhex(h)) for h in json.loads(sys.stdin.read())]
try:
    w.decode_response(w.error_response(w.ErrorCode.READ_ONLY_INDEX))
    error = None
except w.NsmError as err:
    error = err.code.value
print(json.dumps({"cbor2": cbor2.__file__, "requests": [r.hex() for r in requests],
                  "responses": [repr(r) for r in responses], "error": error}))
"""


def test_the_wire_module_runs_on_the_guests_python_and_cbor2() -> None:
    python = shutil.which("python3", path="/usr/bin")
    if python is None or subprocess.run([python, "-I", "-c", "import cbor2"], capture_output=True).returncode:
        pytest.skip("the guest's Python with python3-cbor2 is not installed on this host")
    responses = [
        wire.describe_pcr_response(lock=False, data=b"z" * 48),
        wire.describe_nsm_response(version=(1, 0, 0), module_id="m", max_pcrs=32, locked_pcrs=[0]),
    ]
    done = subprocess.run(
        [python, "-I", "-c", GUEST_SCRIPT, str(GUEST_INIT)],
        capture_output=True,
        text=True,
        input=json.dumps([r.hex() for r in responses]),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "/usr/lib/python3" in out["cbor2"]
    assert out["requests"] == [
        r.hex()
        for r in (
            wire.describe_pcr(0),
            wire.extend_pcr(16, b"d"),
            wire.lock_pcr(17),
            wire.lock_pcrs(18),
            wire.describe_nsm(),
            wire.attestation(user_data=b"u", public_key=b"k"),
            wire.get_random(),
        )
    ]
    assert out["responses"] == [repr(wire.decode_response(r)) for r in responses]
    assert out["error"] == "ReadOnlyIndex"
