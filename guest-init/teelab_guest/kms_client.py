"""A KMS client for guests: the AWS KMS JSON protocol over stdlib HTTP on a socket it is given (vsock, TCP,
Unix), optionally in TLS to a KMS whose CA is pinned by hash (``pinned_context``), optional SigV4 signing,
and release to an attested recipient key (CiphertextForRecipient).

Runs on Debian's Python 3.11 with python3-cryptography and python3-asn1crypto only; the harness uses it too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import socket
import ssl
from collections.abc import Callable
from typing import Any

from teelab_guest import kms_sigv4
from teelab_guest.kms_envelope import KEY_ENCRYPTION_ALGORITHM, open_envelope

CONTENT_TYPE = "application/x-amz-json-1.1"
KMS_HOSTNAME = "kms.lab"  # the name guests send and check the KMS certificate against
PIN_ALGORITHM = "sha256"


class KmsCallError(Exception):
    """The KMS answered with an error: ``aws_type`` is its ``__type`` (e.g. AccessDeniedException)."""

    def __init__(self, aws_type: str, message: str, status: int) -> None:
        super().__init__(f"{aws_type} ({status}): {message}")
        self.aws_type = aws_type
        self.message = message
        self.status = status


class KmsTrustError(Exception):
    """The guest will not talk to this KMS. ``reason`` is one of: ``no-pin`` (TLS without a pinned CA),
    ``bad-pin`` (the pin is not ``sha256:<64 hex>``), ``bad-ca`` (the CA offered is not a certificate),
    ``pin-mismatch`` (the CA offered is not the pinned one), ``untrusted-server`` (the server's certificate
    does not chain to the pinned CA or does not name the KMS), ``handshake-failed`` (no TLS session: a
    plain HTTP server, say)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def parse_pin(pin: str) -> bytes:
    """The 32-byte digest of ``sha256:<64 hex>``; KmsTrustError ``bad-pin`` for anything else."""
    algorithm, _, digest = pin.partition(":")
    try:
        value = bytes.fromhex(digest)
    except ValueError:
        value = b""
    if algorithm != PIN_ALGORITHM or len(value) != 32:
        raise KmsTrustError("bad-pin", f"KMS CA pin {pin[:80]!r} is not {PIN_ALGORITHM}:<64 hex digits>")
    return value


def pinned_context(ca: str | bytes, pin: str | None) -> ssl.SSLContext:
    """A TLS client context trusting ``ca`` (PEM text or DER, from anywhere: it is untrusted until its SHA-256
    equals ``pin``) and nothing else, with hostname checking; KmsTrustError when it cannot be had."""
    if not pin:
        raise KmsTrustError("no-pin", "no pinned KMS CA: refusing to trust any KMS")
    expected = parse_pin(pin)
    try:
        der = ssl.PEM_cert_to_DER_cert(ca) if isinstance(ca, str) else ca
    except ValueError as exc:
        raise KmsTrustError("bad-ca", f"the KMS CA offered is not a PEM certificate: {exc}") from None
    offered = hashlib.sha256(der).digest()
    if not hmac.compare_digest(offered, expected):
        raise KmsTrustError(
            "pin-mismatch", f"the KMS CA offered has SHA-256 {offered.hex()}, the pin wants {expected.hex()}"
        )
    context = ssl.create_default_context(cadata=der)  # loads this CA only, no system roots
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Connection(http.client.HTTPConnection):
    def __init__(
        self, host: str, connect: Callable[[], socket.socket], timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(host, timeout=timeout)
        self._connect = connect
        self._tls = tls
        self._body: bytes | None = None

    def endheaders(self, message_body: Any = None, *, encode_chunked: bool = False) -> None:
        """Send the head and a bytes body in one write (one TLS record, one vsock packet), not two."""
        if isinstance(message_body, bytes) and not encode_chunked:
            self._body, message_body = message_body, None
        super().endheaders(message_body, encode_chunked=encode_chunked)

    def send(self, data: Any) -> None:
        if self._body is not None:
            data, self._body = bytes(data) + self._body, None
        super().send(data)

    def connect(self) -> None:
        sock = self._connect()
        sock.settimeout(self.timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # A request too large for one segment still goes in pieces: with Nagle a last small one would
            # wait for the server's delayed ACK (40 ms on Linux) on a kept connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host.split(":")[0])
            except ssl.SSLCertVerificationError as exc:
                sock.close()
                raise KmsTrustError("untrusted-server", exc.verify_message or str(exc)) from None
            except ssl.SSLError as exc:
                sock.close()
                raise KmsTrustError("handshake-failed", f"no TLS session with the KMS: {exc}") from None
        self.sock = sock


class Transport:
    """How to reach the KMS: a function that opens a connected stream socket, and the Host header to send."""

    def __init__(
        self,
        connect: Callable[[], socket.socket],
        host: str = KMS_HOSTNAME,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.connect = connect
        self.host = host
        self.tls = tls

    @classmethod
    def tcp(cls, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> Transport:
        return cls(lambda: socket.create_connection((host, port)), f"{host}:{port}", tls)

    @classmethod
    def vsock(
        cls, cid: int, port: int, *, host: str = KMS_HOSTNAME, tls: ssl.SSLContext | None = None
    ) -> Transport:
        """To the parent's vsock-proxy (CID 3 port 8000 in the Nitro convention); with ``tls``, TLS end to
        end through it to the KMS, checked against ``host``."""
        return cls(_connector(socket.AF_VSOCK, (cid, port)), host, tls)

    @classmethod
    def unix(cls, path: str, *, host: str = KMS_HOSTNAME, tls: ssl.SSLContext | None = None) -> Transport:
        return cls(_connector(socket.AF_UNIX, path), host, tls)

    @classmethod
    def endpoint(cls, endpoint: str, *, tls: ssl.SSLContext | None = None) -> Transport:
        """From ``http://HOST:PORT``, ``https://HOST:PORT`` or ``unix:PATH`` (what the lab KMS reports)."""
        if endpoint.startswith("unix:"):
            return cls.unix(endpoint[5:])
        scheme, _, rest = endpoint.partition("://")
        host, _, port = rest.rstrip("/").rpartition(":")
        if scheme == "https" and tls is None:
            tls = ssl.create_default_context()
        return cls.tcp(host.strip("[]"), int(port), tls=tls if scheme == "https" else None)


class KmsClient:
    """Calls KMS operations; unsigned unless ``access_key`` and ``secret`` are given."""

    def __init__(
        self,
        transport: Transport,
        *,
        access_key: str | None = None,
        secret: str | None = None,
        region: str = "us-east-1",
        timeout: float = 30.0,
    ) -> None:
        self.transport = transport
        self.access_key = access_key
        self.secret = secret
        self.region = region
        self.timeout = timeout
        self._conn: _Connection | None = None

    def call(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one operation; the decoded JSON answer, or KmsCallError."""
        payload = json.dumps(body).encode()
        target = f"TrentService.{operation}"
        if self.access_key and self.secret:
            headers = kms_sigv4.sign(
                access_key=self.access_key,
                secret=self.secret,
                region=self.region,
                host=self.transport.host,
                target=target,
                body=payload,
            )
        else:
            headers = {"host": self.transport.host, "content-type": CONTENT_TYPE, "x-amz-target": target}
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("POST", "/", body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        if response.will_close:
            self.close()
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {"message": data[:200].decode("utf-8", "replace")}
        if response.status != 200:
            raise KmsCallError(
                str(answer.get("__type", "HTTP")).split("#")[-1],
                str(answer.get("message", "")),
                response.status,
            )
        return answer

    def _connection(self) -> _Connection:
        if self._conn is None:
            self._conn = _Connection(
                self.transport.host, self.transport.connect, self.timeout, self.transport.tls
            )
        return self._conn

    def connect(self) -> None:
        """Open the connection now (TLS handshake included) rather than at the first call, so a caller can
        overlap it with other work; KmsTrustError or OSError as the first call would raise them."""
        conn = self._connection()
        if conn.sock is None:
            conn.connect()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations -----------------------------------------------------------------------------------------

    def encrypt(self, key_id: str, plaintext: bytes, context: dict[str, str] | None = None) -> bytes:
        body: dict[str, Any] = {"KeyId": key_id, "Plaintext": _b64(plaintext)}
        if context:
            body["EncryptionContext"] = context
        return base64.b64decode(self.call("Encrypt", body)["CiphertextBlob"])

    def decrypt(
        self,
        ciphertext: bytes,
        *,
        key_id: str | None = None,
        context: dict[str, str] | None = None,
        recipient: RecipientKey | None = None,
        evidence: bytes | None = None,
        nonce: bytes | None = None,
    ) -> bytes:
        """The plaintext; with ``recipient`` and ``evidence`` it travels as CiphertextForRecipient and is
        opened here with the recipient's private key."""
        body: dict[str, Any] = {"CiphertextBlob": _b64(ciphertext)}
        if key_id:
            body["KeyId"] = key_id
        if context:
            body["EncryptionContext"] = context
        return self._released("Decrypt", body, recipient, evidence, nonce)

    def generate_data_key(
        self,
        key_id: str,
        *,
        key_spec: str = "AES_256",
        recipient: RecipientKey | None = None,
        evidence: bytes | None = None,
        nonce: bytes | None = None,
    ) -> tuple[bytes, bytes]:
        """(plaintext data key, CiphertextBlob of it)."""
        body = {"KeyId": key_id, "KeySpec": key_spec}
        answer: dict[str, Any] = {}
        plaintext = self._released("GenerateDataKey", body, recipient, evidence, nonce, answer)
        return plaintext, base64.b64decode(answer["CiphertextBlob"])

    def generate_random(
        self,
        count: int,
        *,
        recipient: RecipientKey | None = None,
        evidence: bytes | None = None,
        nonce: bytes | None = None,
    ) -> bytes:
        return self._released("GenerateRandom", {"NumberOfBytes": count}, recipient, evidence, nonce)

    def _released(
        self,
        operation: str,
        body: dict[str, Any],
        recipient: RecipientKey | None,
        evidence: bytes | None,
        nonce: bytes | None,
        answer_out: dict[str, Any] | None = None,
    ) -> bytes:
        if recipient is not None:
            if evidence is None:
                raise ValueError("a recipient needs its attestation evidence")
            body["Recipient"] = recipient.field(evidence, nonce=nonce)
        answer = self.call(operation, body)
        if answer_out is not None:
            answer_out.update(answer)
        if recipient is None:
            return base64.b64decode(answer["Plaintext"])
        if "Plaintext" in answer:
            raise KmsCallError("ProtocolError", "the KMS sent Plaintext to an attested recipient", 200)
        return recipient.open(base64.b64decode(answer["CiphertextForRecipient"]))


class RecipientKey:
    """An ephemeral RSA key pair that attestation evidence binds; the KMS seals what it releases to it."""

    def __init__(self, private_key: Any = None, bits: int = 2048) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.private_key = private_key or rsa.generate_private_key(public_exponent=65537, key_size=bits)

    @property
    def public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo DER: what goes into the attestation document's public_key (or report_data)."""
        from cryptography.hazmat.primitives import serialization

        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def field(self, evidence: bytes, *, nonce: bytes | None = None) -> dict[str, str]:
        """The request's Recipient. Enclave documents carry key and nonce inside; SNP reports and TDX quotes
        (``nonce`` given) send them beside the evidence, bound through report_data."""
        recipient = {
            "AttestationDocument": _b64(evidence),
            "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
        }
        if nonce is not None:
            recipient["PublicKey"] = _b64(self.public_key_der)
            recipient["Nonce"] = _b64(nonce)
        return recipient

    def open(self, envelope: bytes) -> bytes:
        return open_envelope(envelope, self.private_key)


def _connector(family: int, address: Any) -> Callable[[], socket.socket]:
    """Opens a stream socket of ``family`` connected to ``address`` (closed again if the connect fails)."""

    def connect() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock

    return connect


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
