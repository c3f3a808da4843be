"""The guest's TLS to the KMS: it trusts only the CA its command line pins, checks the server's certificate
and name against it, and refuses a fake KMS, a plain HTTP one, or any KMS when nothing is pinned."""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from teelab_guest.kms_client import KMS_HOSTNAME, KmsClient, KmsTrustError, Transport, pinned_context
from teelab_guest.unseal import cmdline_pin, kms_tls

from harness.kms import KmsServer, Listen
from harness.kms.tls import ca_pin, client_context, ensure_certificate


def guest_transport(server: KmsServer, tls: ssl.SSLContext, host: str = KMS_HOSTNAME) -> Transport:
    """What a guest uses through its vsock-proxy: a byte stream to the KMS, TLS checked against ``host``."""
    port = int(server.endpoint.rsplit(":", 1)[1])
    return Transport(lambda: socket.create_connection(("127.0.0.1", port)), host, tls)


def ca_text(kms_dir: Path) -> str:
    return ensure_certificate(kms_dir)[0].read_text()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsServer]:
    with KmsServer.start(tmp_path_factory.mktemp("real"), Listen(tls=True)) as server:
        yield server


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsServer]:
    """A real TLS KMS with a CA of its own: what a host could run in the real one's place."""
    with KmsServer.start(tmp_path_factory.mktemp("fake"), Listen(tls=True)) as server:
        yield server


def test_the_pin_is_the_sha256_of_the_ca_certificate(real: KmsServer) -> None:
    der = ssl.PEM_cert_to_DER_cert(ca_text(real.kms_dir))
    assert ca_pin(real.kms_dir) == "sha256:" + hashlib.sha256(der).hexdigest()


def test_guest_speaks_tls_to_the_pinned_kms(real: KmsServer) -> None:
    creds = real.credentials("guest")
    tls = pinned_context(ca_text(real.kms_dir), ca_pin(real.kms_dir))
    with KmsClient(guest_transport(real, tls), access_key=creds.access_key, secret=creds.secret) as client:
        assert len(client.generate_random(16)) == 16
        assert isinstance(client._conn.sock, ssl.SSLSocket)  # type: ignore[union-attr]


def test_a_fake_kms_offering_its_own_ca_fails_the_pin(real: KmsServer, fake: KmsServer) -> None:
    with pytest.raises(KmsTrustError) as refused:
        pinned_context(ca_text(fake.kms_dir), ca_pin(real.kms_dir))
    assert refused.value.reason == "pin-mismatch"


def test_a_fake_kms_behind_the_real_ca_fails_the_handshake(real: KmsServer, fake: KmsServer) -> None:
    tls = pinned_context(ca_text(real.kms_dir), ca_pin(real.kms_dir))
    with KmsClient(guest_transport(fake, tls)) as client, pytest.raises(KmsTrustError) as refused:
        client.generate_random(16)
    assert refused.value.reason == "untrusted-server"
    assert list(fake.store.audit()) == []  # not one request reached the fake


def test_a_certificate_for_another_name_is_refused(real: KmsServer) -> None:
    tls = pinned_context(ca_text(real.kms_dir), ca_pin(real.kms_dir))
    client = KmsClient(guest_transport(real, tls, host="kms.elsewhere"))
    with client, pytest.raises(KmsTrustError) as refused:
        client.generate_random(16)
    assert refused.value.reason == "untrusted-server" and "mismatch" in str(refused.value)


def test_plain_http_to_a_guest_expecting_tls_fails(real: KmsServer, tmp_path: Path) -> None:
    tls = pinned_context(ca_text(real.kms_dir), ca_pin(real.kms_dir))
    with KmsServer.start(tmp_path / "plain", Listen()) as plain:
        assert plain.endpoint.startswith("http://")
        with KmsClient(guest_transport(plain, tls)) as client, pytest.raises(KmsTrustError) as refused:
            client.generate_random(16)
    assert refused.value.reason == "handshake-failed"


@pytest.mark.parametrize(
    ("ca", "pin", "reason"),
    [
        ("real", None, "no-pin"),
        ("real", "", "no-pin"),
        (None, "real", "bad-ca"),
        ("real", "sha384:" + "00" * 32, "bad-pin"),
        ("real", "sha256:" + "zz" * 32, "bad-pin"),
        ("real", "sha256:" + "00" * 31, "bad-pin"),
        ("not a certificate", "real", "bad-ca"),
    ],
)
def test_the_guest_fails_closed(real: KmsServer, ca: str | None, pin: str | None, reason: str) -> None:
    ca = ca_text(real.kms_dir) if ca == "real" else ca
    pin = ca_pin(real.kms_dir) if pin == "real" else pin
    with pytest.raises(KmsTrustError) as refused:
        kms_tls(ca, pin)
    assert refused.value.reason == reason


def test_the_pin_comes_from_the_kernel_command_line(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 teelab.role=cvm teelab.kms_ca=sha256:{'ab' * 32} quiet\n")
    assert cmdline_pin(str(cmdline)) == "sha256:" + "ab" * 32
    cmdline.write_text("console=ttyS0 teelab.role=cvm teelab.kms_ca=\n")
    assert cmdline_pin(str(cmdline)) is None


def test_the_server_certificate_names_the_guests_kms_host(tmp_path: Path) -> None:
    _, cert_pem, _ = ensure_certificate(tmp_path / "kms")
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert KMS_HOSTNAME in names.get_values_for_type(x509.DNSName)


def test_the_chain_a_guest_verifies_is_p256(tmp_path: Path) -> None:
    """P-384 verification cost a guest's handshake about 10 ms more under emulation."""
    ca_pem, cert_pem, _ = ensure_certificate(tmp_path / "kms")
    for pem in (ca_pem, cert_pem):
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
        assert cert.signature_hash_algorithm.name == "sha256"  # type: ignore[union-attr]


def test_a_certificate_made_before_the_guest_name_is_made_anew(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    ca_pem, cert_pem, _ = ensure_certificate(tmp_path / "kms")
    old_pin = ca_pin(tmp_path / "kms")
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    cert_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))  # a certificate without kms.lab
    assert ca_pin(tmp_path / "kms") != old_pin
    test_the_server_certificate_names_the_guests_kms_host(tmp_path)


def test_host_clients_verify_with_the_dirs_ca(real: KmsServer) -> None:
    creds = real.credentials("operator")
    transport = Transport.endpoint(real.endpoint, tls=client_context(real.kms_dir))
    with KmsClient(transport, access_key=creds.access_key, secret=creds.secret) as client:
        assert len(client.generate_random(8)) == 8


def test_connect_opens_tls_before_the_first_call_and_the_call_uses_it(real: KmsServer) -> None:
    """unseal opens the connection while it makes its key: the handshake is done before the round trip."""
    creds = real.credentials("guest")
    tls = pinned_context(ca_text(real.kms_dir), ca_pin(real.kms_dir))
    with KmsClient(guest_transport(real, tls), access_key=creds.access_key, secret=creds.secret) as client:
        client.connect()
        sock = client._conn.sock  # type: ignore[union-attr]
        assert isinstance(sock, ssl.SSLSocket) and sock.version() is not None  # handshake done
        assert len(client.generate_random(16)) == 16
        assert client._conn.sock is sock  # type: ignore[union-attr]


def test_connect_to_a_fake_kms_is_refused_at_connect(real: KmsServer, fake: KmsServer) -> None:
    tls = pinned_context(ca_text(real.kms_dir), ca_pin(real.kms_dir))
    with KmsClient(guest_transport(fake, tls)) as client, pytest.raises(KmsTrustError) as refused:
        client.connect()
    assert refused.value.reason == "untrusted-server"
