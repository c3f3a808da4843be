"""The enclave security module state machine: every request, every error, locking, extend arithmetic, debug
mode, size limits, threads, and random CBOR that must only ever produce responses."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from teelab_guest import nsm_wire as wire
from teelab_guest.nsm_wire import ErrorCode, NsmError

from harness.enclave.errors import SecurityModuleConfigInvalid
from harness.enclave.nsm import SecurityModule

BOOT = {
    0: b"\x00" * 47 + b"\x01",
    1: b"\x11" * 48,
    2: b"\x22" * 48,
    3: b"\x33" * 48,
    4: b"\x44" * 48,
    8: b"\x88" * 48,
}
ZERO = bytes(48)


class Issuer:
    """Records what the module asks to be signed and returns a stand-in document."""

    def __init__(self, document: bytes | None = None, fail: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.document = document
        self.fail = fail

    def __call__(self, **claims: Any) -> bytes:
        self.calls.append(claims)
        if self.fail:
            raise RuntimeError("signer down")
        return self.document if self.document is not None else cbor2.dumps({"doc": len(self.calls)})


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def module(issuer: Issuer) -> SecurityModule:
    return SecurityModule(
        BOOT,
        debug=False,
        issue_document=issuer,
        module_id="i-0abc-enc0001",
        random=lambda n: bytes(i % 256 for i in range(n)),
    )


def ask(module: SecurityModule, request: bytes) -> Any:
    """The decoded response; an {"Error": code} comes back as the code."""
    response = module.handle(request)
    assert len(response) <= wire.RESPONSE_MAX_BYTES
    try:
        return wire.decode_response(response)
    except NsmError as err:
        return err.code


def raw(value: Any) -> bytes:
    return cbor2.dumps(value)


# ------------------------------------------------------------------------------------------------ PCRs


def test_boot_pcrs_are_set_and_0_to_15_locked(module: SecurityModule) -> None:
    assert ask(module, wire.describe_pcr(0)) == wire.DescribePcrResponse(lock=True, data=BOOT[0])
    assert ask(module, wire.describe_pcr(8)) == wire.DescribePcrResponse(lock=True, data=BOOT[8])
    assert ask(module, wire.describe_pcr(15)) == wire.DescribePcrResponse(lock=True, data=ZERO)
    assert ask(module, wire.describe_pcr(16)) == wire.DescribePcrResponse(lock=False, data=ZERO)
    assert ask(module, wire.describe_pcr(31)) == wire.DescribePcrResponse(lock=False, data=ZERO)


@pytest.mark.parametrize(
    "request_",
    [
        wire.describe_pcr(32),
        wire.describe_pcr(0xFFFF),
        wire.extend_pcr(32, b"x"),
        wire.lock_pcr(32),
        wire.lock_pcrs(33),
    ],
    ids=["describe", "describe max", "extend", "lock", "lock range"],
)
def test_indexes_past_31_are_invalid(module: SecurityModule, request_: bytes) -> None:
    assert ask(module, request_) == ErrorCode.INVALID_INDEX


def test_extend_is_sha384_of_the_old_value_and_the_data(module: SecurityModule) -> None:
    once = hashlib.sha384(ZERO + b"first").digest()
    twice = hashlib.sha384(once + b"second").digest()
    assert ask(module, wire.extend_pcr(16, b"first")) == wire.ExtendPcrResponse(data=once)
    assert ask(module, wire.extend_pcr(16, b"second")) == wire.ExtendPcrResponse(data=twice)
    assert ask(module, wire.describe_pcr(16)).data == twice
    assert ask(module, wire.extend_pcr(31, b"")) == wire.ExtendPcrResponse(data=hashlib.sha384(ZERO).digest())
    # serde_bytes also reads text and arrays of bytes
    assert ask(module, raw({"ExtendPCR": {"index": 17, "data": "first"}})).data == once
    assert ask(module, raw({"ExtendPCR": {"index": 18, "data": list(b"first")}})).data == once


@pytest.mark.parametrize("index", [0, 3, 4, 8, 15])
def test_boot_pcrs_cannot_be_extended_or_locked_again(module: SecurityModule, index: int) -> None:
    assert ask(module, wire.extend_pcr(index, b"x")) == ErrorCode.READ_ONLY_INDEX
    assert ask(module, wire.lock_pcr(index)) == ErrorCode.READ_ONLY_INDEX
    assert ask(module, wire.describe_pcr(index)).data == BOOT.get(index, ZERO)


def test_a_locked_pcr_keeps_its_value(module: SecurityModule) -> None:
    value = ask(module, wire.extend_pcr(20, b"app")).data
    assert ask(module, wire.lock_pcr(20)) == wire.LockPcrResponse()
    assert ask(module, wire.extend_pcr(20, b"more")) == ErrorCode.READ_ONLY_INDEX
    assert ask(module, wire.lock_pcr(20)) == ErrorCode.READ_ONLY_INDEX
    assert ask(module, wire.describe_pcr(20)) == wire.DescribePcrResponse(lock=True, data=value)
    assert ask(module, wire.extend_pcr(21, b"other")).data  # neighbours stay open
    assert 20 in module.locked_pcrs and 21 not in module.locked_pcrs


def test_lock_pcrs_locks_the_range_from_zero(module: SecurityModule) -> None:
    assert ask(module, wire.lock_pcrs(0)) == wire.LockPcrsResponse()
    assert module.locked_pcrs == frozenset(range(16))
    assert ask(module, wire.lock_pcrs(20)) == wire.LockPcrsResponse()
    assert module.locked_pcrs == frozenset(range(20))
    assert ask(module, wire.extend_pcr(19, b"x")) == ErrorCode.READ_ONLY_INDEX
    assert ask(module, wire.extend_pcr(20, b"x")).data
    assert ask(module, wire.lock_pcrs(32)) == wire.LockPcrsResponse()
    assert module.locked_pcrs == frozenset(range(32))


def test_describe_nsm_reports_the_module(module: SecurityModule) -> None:
    described = ask(module, wire.describe_nsm())
    assert described == wire.DescribeNsmResponse(
        version_major=1,
        version_minor=0,
        version_patch=0,
        module_id="i-0abc-enc0001",
        max_pcrs=32,
        locked_pcrs=tuple(range(16)),
        digest="SHA384",
    )
    ask(module, wire.lock_pcr(30))
    assert ask(module, wire.describe_nsm()).locked_pcrs == (*range(16), 30)


def test_get_random_returns_256_bytes_from_the_entropy_source(module: SecurityModule) -> None:
    assert ask(module, wire.get_random()) == wire.GetRandomResponse(random=bytes(range(256)))
    real = SecurityModule({}, debug=False, issue_document=Issuer(), module_id="m")
    first, second = ask(real, wire.get_random()).random, ask(real, wire.get_random()).random
    assert len(first) == 256 and first != second


def test_a_failing_entropy_source_is_an_internal_error() -> None:
    broken = SecurityModule(
        {}, debug=False, issue_document=Issuer(), module_id="m", random=lambda n: b"short"
    )
    assert ask(broken, wire.get_random()) == ErrorCode.INTERNAL_ERROR


# ------------------------------------------------------------------------------------------------ attestation


def test_attestation_signs_the_locked_pcrs_and_the_callers_fields(
    module: SecurityModule, issuer: Issuer
) -> None:
    ask(module, wire.extend_pcr(16, b"app"))
    ask(module, wire.lock_pcr(16))
    ask(module, wire.extend_pcr(17, b"unlocked"))
    response = ask(module, wire.attestation(user_data=b"hello", nonce=b"n" * 16, public_key=b"DER key"))
    assert response == wire.AttestationResponse(document=cbor2.dumps({"doc": 1}))
    [claims] = issuer.calls
    assert (
        claims["user_data"] == b"hello"
        and claims["nonce"] == b"n" * 16
        and claims["public_key"] == b"DER key"
    )
    assert claims["module_id"] == "i-0abc-enc0001"
    assert sorted(claims["pcrs"]) == [*range(17)]
    assert claims["pcrs"][0] == BOOT[0] and claims["pcrs"][5] == ZERO
    assert claims["pcrs"][16] == hashlib.sha384(ZERO + b"app").digest()


def test_attestation_fields_are_optional_and_null(module: SecurityModule, issuer: Issuer) -> None:
    ask(module, wire.attestation())
    ask(module, raw({"Attestation": {}}))
    assert [(c["user_data"], c["nonce"], c["public_key"]) for c in issuer.calls] == [(None, None, None)] * 2


def test_qingtian_pubkey_is_accepted_for_public_key(module: SecurityModule, issuer: Issuer) -> None:
    ask(module, raw({"Attestation": {"user_data": None, "nonce": None, "pubkey": b"qt key"}}))
    assert issuer.calls[-1]["public_key"] == b"qt key"
    both = raw({"Attestation": {"public_key": b"a", "pubkey": b"b"}})
    assert ask(module, both) == ErrorCode.INVALID_ARGUMENT


def test_a_debug_module_attests_with_all_zero_pcrs(issuer: Issuer) -> None:
    debug = SecurityModule(BOOT, debug=True, issue_document=issuer, module_id="dbg")
    ask(debug, wire.extend_pcr(16, b"x"))
    ask(debug, wire.lock_pcr(16))
    ask(debug, wire.attestation(nonce=b"n"))
    pcrs = issuer.calls[0]["pcrs"]
    assert sorted(pcrs) == [*range(17)] and set(pcrs.values()) == {ZERO}
    assert ask(debug, wire.describe_pcr(0)).data == BOOT[0]


@pytest.mark.parametrize("field", ["user_data", "nonce", "public_key", "pubkey"])
def test_attestation_fields_over_1024_bytes_are_too_large(
    module: SecurityModule, issuer: Issuer, field: str
) -> None:
    assert isinstance(ask(module, raw({"Attestation": {field: b"x" * 1024}})), wire.AttestationResponse)
    assert ask(module, raw({"Attestation": {field: b"x" * 1025}})) == ErrorCode.INPUT_TOO_LARGE
    assert len(issuer.calls) == 1


def test_a_failing_signer_is_an_internal_error() -> None:
    failing = SecurityModule(BOOT, debug=False, issue_document=Issuer(fail=True), module_id="m")
    assert ask(failing, wire.attestation()) == ErrorCode.INTERNAL_ERROR


def test_a_response_over_12_kib_is_refused_as_too_large() -> None:
    fits = SecurityModule(BOOT, debug=False, issue_document=Issuer(document=b"d" * 12_000), module_id="m")
    assert ask(fits, wire.attestation()).document == b"d" * 12_000
    huge = SecurityModule(BOOT, debug=False, issue_document=Issuer(document=b"d" * 12_288), module_id="m")
    assert ask(huge, wire.attestation()) == ErrorCode.INPUT_TOO_LARGE


# -------------------------------------------------------------------------------------------- bad requests


def test_requests_over_4_kib_are_too_large(module: SecurityModule) -> None:
    header = len(raw({"ExtendPCR": {"index": 16, "data": b""}}))
    exactly = raw({"ExtendPCR": {"index": 16, "data": b"x" * (4096 - header - 2)}})
    assert len(exactly) == 4096 and isinstance(ask(module, exactly), wire.ExtendPcrResponse)
    over = raw({"ExtendPCR": {"index": 16, "data": b"x" * (4097 - header - 2)}})
    assert len(over) == 4097 and ask(module, over) == ErrorCode.INPUT_TOO_LARGE


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (b"", ErrorCode.INVALID_OPERATION),
        (b"\xff\xff", ErrorCode.INVALID_OPERATION),
        (raw("DescribeNSM") + b"\x00", ErrorCode.INVALID_OPERATION),
        (raw("Reboot"), ErrorCode.INVALID_OPERATION),
        (raw({"Reboot": {}}), ErrorCode.INVALID_OPERATION),
        (raw(42), ErrorCode.INVALID_OPERATION),
        (raw({"DescribePCR": {"index": 0}, "GetRandom": None}), ErrorCode.INVALID_OPERATION),
        (raw("DescribePCR"), ErrorCode.INVALID_OPERATION),
        (raw({"DescribePCR": [0]}), ErrorCode.INVALID_ARGUMENT),
        (raw({"DescribePCR": {}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"DescribePCR": {"index": -1}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"DescribePCR": {"index": 65536}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"DescribePCR": {"index": "0"}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"DescribePCR": {"index": True}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"DescribePCR": {"index": 1.0}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"ExtendPCR": {"index": 16}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"ExtendPCR": {"index": 16, "data": 5}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"ExtendPCR": {"index": 16, "data": [256]}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"LockPCRs": {"index": 3}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"Attestation": {"nonce": 7}}), ErrorCode.INVALID_ARGUMENT),
        (raw({"Attestation": None}), ErrorCode.INVALID_ARGUMENT),
        (raw({"DescribeNSM": 1}), ErrorCode.INVALID_ARGUMENT),
    ],
)
def test_malformed_requests_get_the_right_error(
    module: SecurityModule, request_: bytes, code: ErrorCode
) -> None:
    assert ask(module, request_) == code


def test_unit_requests_are_also_accepted_in_map_form(module: SecurityModule) -> None:
    assert isinstance(ask(module, raw({"DescribeNSM": None})), wire.DescribeNsmResponse)
    assert isinstance(ask(module, raw({"GetRandom": None})), wire.GetRandomResponse)


def test_unknown_argument_keys_are_ignored_as_serde_does(module: SecurityModule) -> None:
    assert ask(module, raw({"DescribePCR": {"index": 2, "verbose": True}})).data == BOOT[2]


def test_something_other_than_bytes_is_an_invalid_argument(module: SecurityModule) -> None:
    assert ask(module, "DescribeNSM") == ErrorCode.INVALID_ARGUMENT  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("boot", "module_id"),
    [({16: ZERO}, "m"), ({-1: ZERO}, "m"), ({0: b"short"}, "m"), ({0: "text" * 12}, "m"), ({}, "")],
)
def test_a_bad_configuration_is_a_coded_error(boot: dict[int, Any], module_id: str) -> None:
    with pytest.raises(SecurityModuleConfigInvalid) as raised:
        SecurityModule(boot, debug=False, issue_document=Issuer(), module_id=module_id)
    assert raised.value.code == "E920"


# ------------------------------------------------------------------------------------------------ concurrency


def test_concurrent_extends_lose_no_update(module: SecurityModule) -> None:
    threads, rounds = 8, 40
    barrier = threading.Barrier(threads)

    def worker() -> None:
        barrier.wait()
        for _ in range(rounds):
            assert isinstance(ask(module, wire.extend_pcr(24, b"tick")), wire.ExtendPcrResponse)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    expected = ZERO
    for _ in range(threads * rounds):
        expected = hashlib.sha384(expected + b"tick").digest()
    assert module.pcr(24) == expected


# -------------------------------------------------------------------------------------------- random input

NAMES = [op.value for op in wire.Operation] + ["Error", "pubkey", "index", "data", "range", "nonce"]
cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.binary(max_size=64)
    | st.text(max_size=16)
    | st.sampled_from(NAMES)
    | st.integers(0, 40),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(
            st.sampled_from(NAMES) | st.text(max_size=8) | st.integers(-5, 40), children, max_size=5
        )
    ),
    max_leaves=20,
)
requests = cbor_values | st.builds(lambda name, body: {name: body}, st.sampled_from(NAMES), cbor_values)


def _check_any_response(module: SecurityModule, request: bytes) -> None:
    response = module.handle(request)
    assert isinstance(response, bytes) and len(response) <= wire.RESPONSE_MAX_BYTES
    try:
        decoded = wire.decode_response(response)
    except NsmError as err:
        assert err.code is not ErrorCode.INVALID_RESPONSE, "the module answered something undecodable"
        assert err.code is not ErrorCode.INTERNAL_ERROR, "a request crashed the module"
        assert cbor2.loads(response) == {"Error": err.code.value}
        return
    # a success is an answer to a request that parses
    parsed = wire.parse_request(request)
    assert type(decoded).__name__.replace("Response", "") == type(parsed).__name__.replace("Request", "")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_random_cbor_requests_only_ever_get_responses(request: Any) -> None:
    module = SecurityModule(BOOT, debug=False, issue_document=Issuer(), module_id="fuzz")
    _check_any_response(module, cbor2.dumps(request))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=5000))
def test_random_bytes_only_ever_get_responses(request: bytes) -> None:
    module = SecurityModule(BOOT, debug=False, issue_document=Issuer(), module_id="fuzz")
    _check_any_response(module, request)
