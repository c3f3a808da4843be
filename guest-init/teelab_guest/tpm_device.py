"""The few TPM 2.0 commands a teelab guest sends, marshalled by hand over ``/dev/tpmrm0`` (the kernel's
resource manager: transient objects and sessions are flushed when the file is closed).

Debian's tpm2-tools and tpm2-pytss load their device TCTI with dlopen, which the image's trimmed library set
does not keep; these ten commands are small enough to marshal here: PCR_Extend, PCR_Read, NV_ReadPublic,
NV_Read, CreatePrimary, StartAuthSession, PolicySecret, ActivateCredential, Quote and FlushContext.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from teelab_guest.tpm_wire import ALG_NULL, ALG_SHA256, Reader, ak_template, pcr_selection, tpm2b, u16, u32

DEVICE = "/dev/tpmrm0"
ST_NO_SESSIONS, ST_SESSIONS = 0x8001, 0x8002
RS_PW, RH_OWNER, RH_NULL, RH_ENDORSEMENT = 0x40000009, 0x40000001, 0x40000007, 0x4000000B
CC_FLUSH_CONTEXT, CC_NV_READ, CC_POLICY_SECRET, CC_CREATE_PRIMARY, CC_ACTIVATE_CREDENTIAL = (
    0x165,
    0x14E,
    0x151,
    0x131,
    0x147,
)
CC_QUOTE, CC_NV_READ_PUBLIC, CC_START_AUTH_SESSION, CC_PCR_READ, CC_PCR_EXTEND = (
    0x158,
    0x169,
    0x176,
    0x17E,
    0x182,
)
SE_POLICY = 0x01
NV_CHUNK = 768  # below every TPM's TPM2_PT_NV_BUFFER_MAX
RSA_EK_HANDLE, RSA_EK_CERT_INDEX = 0x81010001, 0x01C00002
RC_AGAIN = (0x908, 0x90A, 0x922)  # yielded, testing, retry: the TPM did not run the command; send it again
RETRIES = 20
PASSWORD = u32(RS_PW) + u16(0) + b"\0" + u16(0)  # the empty-password session


class TpmError(RuntimeError):
    """The TPM answered with a response code other than success."""

    def __init__(self, command: int, rc: int) -> None:
        super().__init__(f"TPM command {command:#x} failed with response code {rc:#x}")
        self.command = command
        self.rc = rc


@dataclass(frozen=True)
class AttestationKey:
    handle: int
    public: bytes  # TPMT_PUBLIC
    name: bytes


class Tpm:
    """One open TPM: ``transact`` sends a whole command and returns the whole response; ``close`` ends the
    connection (for ``/dev/tpmrm0``: the resource manager then flushes what this connection loaded)."""

    def __init__(self, transact: Callable[[bytes], bytes], close: Callable[[], None] = lambda: None) -> None:
        self.transact = transact
        self.close = close

    @classmethod
    def open(cls, path: str = DEVICE) -> Tpm:
        fd = os.open(path, os.O_RDWR)

        def transact(command: bytes) -> bytes:
            os.write(fd, command)
            return os.read(fd, 4096)

        return cls(transact, lambda: os.close(fd))

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(
        self,
        code: int,
        handles: list[int],
        params: bytes,
        sessions: list[bytes] | None = None,
        *,
        out: int = 0,
    ) -> tuple[list[int], Reader]:
        """Send a command; returns its ``out`` response handles and a reader over its parameters."""
        body = b"".join(u32(h) for h in handles)
        if sessions is not None:
            area = b"".join(sessions)
            body += u32(len(area)) + area
        body += params
        tag = ST_NO_SESSIONS if sessions is None else ST_SESSIONS
        for _ in range(RETRIES):
            response = self.transact(u16(tag) + u32(10 + len(body)) + u32(code) + body)
            r = Reader(response)
            tag_back, size, rc = r.u16(), r.u32(), r.u32()
            if rc not in RC_AGAIN:
                break
        if rc != 0:
            raise TpmError(code, rc)
        if size != len(response):
            raise TpmError(code, 0xFFFFFFFF)
        got = [r.u32() for _ in range(out)]
        if tag_back == ST_SESSIONS:
            return got, Reader(r.take(r.u32()))
        return got, Reader(response[r.at :])

    # -- PCRs -------------------------------------------------------------------------------------
    def pcr_extend(self, index: int, digest: bytes) -> None:
        self.command(CC_PCR_EXTEND, [index], u32(1) + u16(ALG_SHA256) + digest, [PASSWORD])

    def pcr_read(self, indexes: list[int]) -> dict[int, bytes]:
        """SHA-256 values of ``indexes`` (the TPM answers at most 8 per command)."""
        values: dict[int, bytes] = {}
        wanted = sorted(set(indexes))
        while len(values) < len(wanted):
            left = [i for i in wanted if i not in values]
            _, r = self.command(CC_PCR_READ, [], pcr_selection(left))
            r.u32()  # update counter
            got = r.pcr_selection().get(ALG_SHA256, ())
            digests = [r.tpm2b() for _ in range(r.u32())]
            if not got:
                raise TpmError(CC_PCR_READ, 0xFFFFFFFE)
            values.update(zip(got, digests, strict=True))
        return values

    # -- the EK certificate -----------------------------------------------------------------------
    def nv_read(self, index: int) -> bytes:
        _, r = self.command(CC_NV_READ_PUBLIC, [index], b"")
        public = Reader(r.tpm2b())
        public.take(4 + 2 + 4)  # index, nameAlg, attributes
        public.tpm2b()  # authPolicy
        size = public.u16()
        data = b""
        while len(data) < size:
            chunk = min(NV_CHUNK, size - len(data))
            _, r = self.command(CC_NV_READ, [RH_OWNER, index], u16(chunk) + u16(len(data)), [PASSWORD])
            data += r.tpm2b()
        return data

    # -- the attestation key ----------------------------------------------------------------------
    def create_ak(self) -> AttestationKey:
        """The AK as a primary key of the endorsement hierarchy: the same key whenever it is made again."""
        sensitive = tpm2b(tpm2b(b"") + tpm2b(b""))
        params = sensitive + tpm2b(ak_template()) + tpm2b(b"") + u32(0)
        (handle,), r = self.command(CC_CREATE_PRIMARY, [RH_ENDORSEMENT], params, [PASSWORD], out=1)
        public = r.tpm2b()
        r.tpm2b()  # creation data
        r.tpm2b()  # creation hash
        r.u16(), r.u32(), r.tpm2b()  # creation ticket
        return AttestationKey(handle, public, r.tpm2b())

    def flush(self, handle: int) -> None:
        self.command(CC_FLUSH_CONTEXT, [], u32(handle))

    def activate_credential(self, ak: AttestationKey, blob: bytes, secret: bytes) -> bytes:
        """Recover a credential made for this TPM's RSA EK and ``ak`` (the EK's policy: PolicySecret with
        the endorsement hierarchy)."""
        nonce = os.urandom(16)
        params = tpm2b(nonce) + tpm2b(b"") + bytes([SE_POLICY]) + u16(ALG_NULL) + u16(ALG_SHA256)
        (session,), _ = self.command(CC_START_AUTH_SESSION, [RH_NULL, RH_NULL], params, out=1)
        params = tpm2b(b"") + tpm2b(b"") + tpm2b(b"") + struct.pack(">i", 0)
        self.command(CC_POLICY_SECRET, [RH_ENDORSEMENT, session], params, [PASSWORD])
        policy = u32(session) + tpm2b(b"") + b"\0" + tpm2b(b"")
        _, r = self.command(
            CC_ACTIVATE_CREDENTIAL, [ak.handle, RSA_EK_HANDLE], blob + secret, [PASSWORD, policy]
        )
        return r.tpm2b()

    def quote(self, ak: AttestationKey, nonce: bytes, pcrs: list[int]) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE) over ``pcrs`` of the SHA-256 bank, with ``nonce`` as extraData."""
        params = tpm2b(nonce) + u16(ALG_NULL) + pcr_selection(pcrs)
        _, r = self.command(CC_QUOTE, [ak.handle], params, [PASSWORD])
        quoted = r.tpm2b()
        return quoted, r.data[r.at :]
