"""The enclave security module (NSM API) as a pure, thread-safe state machine: CBOR request, CBOR response.

The wire format is ``teelab_guest.nsm_wire``, the module guests use, so the two sides cannot drift.
Attestation documents are signed by the ``issue_document`` callable (the lab authority in production).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from teelab_guest import nsm_wire as wire
from teelab_guest.nsm_wire import (
    ATTESTATION_FIELD_MAX_BYTES,
    BOOT_LOCKED_PCRS,
    DIGEST,
    MAX_PCRS,
    PCR_BYTES,
    REQUEST_MAX_BYTES,
    RESPONSE_MAX_BYTES,
    ErrorCode,
    NsmError,
)

from harness.enclave.errors import SecurityModuleConfigInvalid
from harness.enclave.pcrs import extend

log = logging.getLogger(__name__)

MODULE_VERSION = (1, 0, 0)
RANDOM_BYTES = 256
ZERO_PCR = bytes(PCR_BYTES)


class DocumentIssuer(Protocol):
    """Signs an attestation document (COSE_Sign1) over the given claims; the lab authority in production."""

    def __call__(
        self,
        *,
        pcrs: Mapping[int, bytes],
        public_key: bytes | None,
        user_data: bytes | None,
        nonce: bytes | None,
        module_id: str,
        timestamp_ms: int | None = None,
    ) -> bytes: ...


class SecurityModule:
    """One enclave's security module: 32 SHA-384 PCRs, 0-15 set and locked at boot, 16-31 extendable.

    ``handle`` never raises: every problem becomes {"Error": code}. A debug-mode module attests with all-zero
    PCRs (as Nitro does for enclaves whose console is open).
    """

    def __init__(
        self,
        pcrs_at_boot: Mapping[int, bytes],
        *,
        debug: bool,
        issue_document: DocumentIssuer,
        module_id: str,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not isinstance(module_id, str) or not module_id:
            raise SecurityModuleConfigInvalid(
                "the module id must be a non-empty string", hint="pass module_id, e.g. the enclave's id"
            )
        self._pcrs = [ZERO_PCR] * MAX_PCRS
        for index, value in pcrs_at_boot.items():
            if type(index) is not int or not 0 <= index < BOOT_LOCKED_PCRS:
                raise SecurityModuleConfigInvalid(
                    f"boot PCR index {index!r} is outside 0-{BOOT_LOCKED_PCRS - 1}",
                    hint="boot PCRs come from the image (0, 1, 2, 8) and the parent (3, 4)",
                    index=str(index),
                )
            if not isinstance(value, bytes) or len(value) != PCR_BYTES:
                raise SecurityModuleConfigInvalid(
                    f"boot PCR{index} is not {PCR_BYTES} bytes", hint="pass SHA-384 values", index=index
                )
            self._pcrs[index] = value
        self._locked = [index < BOOT_LOCKED_PCRS for index in range(MAX_PCRS)]
        self._state = threading.Lock()
        self.debug = debug
        self.module_id = module_id
        self._issue_document = issue_document
        self._random = random

    # ----------------------------------------------------------------------------------- views for the host

    def pcr(self, index: int) -> bytes:
        with self._state:
            return self._pcrs[index]

    @property
    def locked_pcrs(self) -> frozenset[int]:
        with self._state:
            return frozenset(i for i, locked in enumerate(self._locked) if locked)

    # ----------------------------------------------------------------------------------- the device

    def handle(self, request: bytes) -> bytes:
        """Answer one CBOR request with one CBOR response of at most 12 KiB."""
        try:
            response = self._answer(request)
        except Exception:
            log.exception("security module %s failed on a request", self.module_id)
            response = wire.error_response(ErrorCode.INTERNAL_ERROR)
        if len(response) > RESPONSE_MAX_BYTES:
            # the NSM driver reports a response that does not fit its buffer as InputTooLarge
            response = wire.error_response(ErrorCode.INPUT_TOO_LARGE)
        return response

    def _answer(self, request: bytes) -> bytes:
        if not isinstance(request, (bytes, bytearray, memoryview)):
            return wire.error_response(ErrorCode.INVALID_ARGUMENT)
        if len(request) > REQUEST_MAX_BYTES:
            return wire.error_response(ErrorCode.INPUT_TOO_LARGE)
        try:
            parsed = wire.parse_request(bytes(request))
            return self._dispatch(parsed)
        except NsmError as err:
            return wire.error_response(err.code)

    def _dispatch(self, request: wire.Request) -> bytes:
        handler = {
            wire.DescribePcrRequest: self._describe_pcr,
            wire.ExtendPcrRequest: self._extend_pcr,
            wire.LockPcrRequest: self._lock_pcr,
            wire.LockPcrsRequest: self._lock_pcrs,
            wire.DescribeNsmRequest: self._describe_nsm,
            wire.AttestationRequest: self._attest,
            wire.GetRandomRequest: self._get_random,
        }.get(type(request))
        if handler is None:
            raise NsmError(ErrorCode.INVALID_OPERATION, type(request).__name__)
        return handler(request)  # type: ignore[operator]

    def _describe_pcr(self, request: wire.DescribePcrRequest) -> bytes:
        index = self._index(request.index)
        with self._state:
            return wire.describe_pcr_response(lock=self._locked[index], data=self._pcrs[index])

    def _extend_pcr(self, request: wire.ExtendPcrRequest) -> bytes:
        index = self._index(request.index)
        with self._state:
            if self._locked[index]:
                raise NsmError(ErrorCode.READ_ONLY_INDEX, f"PCR{index} is locked")
            self._pcrs[index] = extend(self._pcrs[index], request.data)
            return wire.extend_pcr_response(data=self._pcrs[index])

    def _lock_pcr(self, request: wire.LockPcrRequest) -> bytes:
        index = self._index(request.index)
        with self._state:
            if self._locked[index]:
                raise NsmError(ErrorCode.READ_ONLY_INDEX, f"PCR{index} is already locked")
            self._locked[index] = True
        return wire.lock_pcr_response()

    def _lock_pcrs(self, request: wire.LockPcrsRequest) -> bytes:
        if request.range > MAX_PCRS:
            raise NsmError(ErrorCode.INVALID_INDEX, f"range {request.range} > {MAX_PCRS}")
        with self._state:
            for index in range(request.range):
                self._locked[index] = True
        return wire.lock_pcrs_response()

    def _describe_nsm(self, _request: wire.DescribeNsmRequest) -> bytes:
        return wire.describe_nsm_response(
            version=MODULE_VERSION,
            module_id=self.module_id,
            max_pcrs=MAX_PCRS,
            locked_pcrs=sorted(self.locked_pcrs),
            digest=DIGEST,
        )

    def _get_random(self, _request: wire.GetRandomRequest) -> bytes:
        random = self._random(RANDOM_BYTES)
        if not isinstance(random, bytes) or len(random) != RANDOM_BYTES:
            raise NsmError(ErrorCode.INTERNAL_ERROR, "the entropy source failed")
        return wire.get_random_response(random=random)

    @staticmethod
    def _index(index: int) -> int:
        if index >= MAX_PCRS:
            raise NsmError(ErrorCode.INVALID_INDEX, f"PCR index {index} >= {MAX_PCRS}")
        return index

    def _attest(self, request: wire.AttestationRequest) -> bytes:
        for name in ("user_data", "nonce", "public_key"):
            value = getattr(request, name)
            if value is not None and len(value) > ATTESTATION_FIELD_MAX_BYTES:
                raise NsmError(
                    ErrorCode.INPUT_TOO_LARGE, f"{name} is over {ATTESTATION_FIELD_MAX_BYTES} bytes"
                )
        with self._state:
            pcrs = {
                i: (ZERO_PCR if self.debug else self._pcrs[i]) for i in range(MAX_PCRS) if self._locked[i]
            }
        try:
            document = self._issue_document(
                pcrs=pcrs,
                public_key=request.public_key,
                user_data=request.user_data,
                nonce=request.nonce,
                module_id=self.module_id,
            )
        except Exception:
            log.exception("security module %s: the document issuer failed", self.module_id)
            raise NsmError(ErrorCode.INTERNAL_ERROR, "the document issuer failed") from None
        if not isinstance(document, bytes):
            raise NsmError(ErrorCode.INTERNAL_ERROR, "the document issuer returned no bytes")
        return wire.attestation_response(document=document)
