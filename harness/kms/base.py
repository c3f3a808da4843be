"""What every KMS operation shares: finding the key (by id, ARN or alias), its state, key policies and the
Recipient check, and release of material (plaintext, or sealed to an attested key)."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teelab_guest.kms_envelope import EnvelopeError, seal

from harness.kms import keyspecs, material
from harness.kms.errors import (
    AccessDenied,
    Disabled,
    EvidenceMalformed,
    InvalidKeyState,
    KeyNotFound,
    KmsRequestError,
)
from harness.kms.fields import b64
from harness.kms.keyring import Keyring
from harness.kms.policy import KeyPolicy, RequestContext, default_policy
from harness.kms.recipient import Attested, Recipient, Verifier, parse_recipient, refuse
from harness.kms.store import KeyRecord, Store

ALIAS_PREFIX = "alias/"
KEY_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Audit:
    """What the audit row of one request will say; filled in as the request is served."""

    operation: str
    principal: str | None
    key_id: str | None = None
    evidence_digest: str | None = None
    reasons: list[str] = field(default_factory=list)
    nonce: tuple[str, float] | None = None


@dataclass(frozen=True)
class Outcome:
    response: dict[str, Any]
    change: Callable[[sqlite3.Connection], Any] | None = None


@dataclass(frozen=True)
class ServiceConfig:
    max_evidence_age_s: float = 300.0  # enclave documents older than this are stale
    max_clock_skew_s: float = 60.0  # documents from the future by more than this are refused
    nonce_ttl_s: float = 86400.0  # how long an SNP/TDX nonce is remembered


class ServiceBase:
    """State and helpers of the KMS service; the operations are its subclasses' ``_op_<Name>`` methods.

    ``clock`` dates requests (signature window, evidence age, deletion dates); ``rotation_clock`` (default:
    ``clock``) decides when automatic rotations fall due, so a test can move it years ahead and still sign."""

    def __init__(
        self,
        store: Store,
        verifier: Verifier,
        config: ServiceConfig | None = None,
        clock: Callable[[], float] = time.time,
        rotation_clock: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        self.keyring = Keyring(store)
        self.verifier = verifier
        self.config = config or ServiceConfig()
        self.clock = clock
        self.rotation_clock = rotation_clock or clock
        self._nonces = store.live_nonces()
        self._nonce_lock = threading.Lock()
        self._policies: dict[str, KeyPolicy] = {}

    @property
    def account(self) -> str:
        return self.store.account

    def _policy(self, text: str) -> KeyPolicy:
        policy = self._policies.get(text)
        if policy is None:
            if len(self._policies) > 1024:
                self._policies.clear()
            policy = self._policies[text] = KeyPolicy.parse(text)
        return policy

    def _account_policy(self) -> str:
        return self.store.account_policy() or default_policy(self.account)

    # -- keys ------------------------------------------------------------------------------------------------

    def _key(self, key_ref: Any, audit: Audit, *, pending_ok: bool = False, name: str = "KeyId") -> KeyRecord:
        """The key ``key_ref`` names (key id, key ARN, alias name or alias ARN). Unless ``pending_ok``, it
        must be enabled: DisabledException or KMSInvalidStateException (pending deletion) say why not."""
        key_id = self._key_id(key_ref, name)
        audit.key_id = key_id
        record = self.store.get_key(key_id, now=self.clock())
        if record is None:
            raise KeyNotFound(f"key {key_id} does not exist", hint="list keys with teelab kms keys")
        if not pending_ok and record.state != "Enabled":
            if record.state == "Disabled":
                raise Disabled(f"key {record.arn} is disabled", hint="EnableKey turns it back on")
            raise InvalidKeyState(f"key {record.arn} is {record.state}")
        return record

    def _key_id(self, key_ref: Any, name: str = "KeyId") -> str:
        """The key id of a key id, key ARN, alias name or alias ARN; NotFoundException if none."""
        if not isinstance(key_ref, str) or not 1 <= len(key_ref) <= 2048:
            raise KmsRequestError(f"{name} must be a string of 1..2048 characters")
        ref = key_ref
        arn = f"arn:aws:kms:{self.store.region}:{self.account}:"
        if ref.startswith(arn):
            ref = ref[len(arn) :]
            if not ref.startswith(ALIAS_PREFIX):
                ref = ref[4:] if ref.startswith("key/") else ""
        if ref.startswith(ALIAS_PREFIX):
            alias = self.keyring.alias(ref)
            if alias is None:
                raise KeyNotFound(f"alias {ref[:256]!r} does not exist", hint="list them with ListAliases")
            return alias.key_id
        if not KEY_ID.match(ref):
            raise KeyNotFound(f"key {key_ref[:128]!r} does not exist")
        return ref

    def _metadata(self, record: KeyRecord) -> dict[str, Any]:
        """DescribeKey's KeyMetadata, with the algorithms of the key's spec and usage."""
        meta = record.metadata(self.account)
        meta.pop("EncryptionAlgorithms", None)
        meta.update(keyspecs.SPECS[record.key_spec].algorithms(record.key_usage))
        return meta

    # -- authorization ---------------------------------------------------------------------------------------

    def _authorize(
        self, policy_text: str, action: str, audit: Audit, recipient: Recipient | None
    ) -> Attested | None:
        """Verify the Recipient (if any) and evaluate ``policy_text``; AccessDenied when it does not allow.
        A statement with attestation conditions never applies without verified evidence: fail closed."""
        policy = self._policy(policy_text)
        attested = None
        if recipient is not None:
            audit.evidence_digest = recipient.digest
            attested = self._attest(recipient, policy, audit)
        ctx = RequestContext(
            action=f"kms:{action}",
            principal=audit.principal,
            attestation=attested.conditions if attested else None,
            vendor_root=attested.vendor_root if attested else True,
            debug=attested.debug if attested else False,
        )
        decision = policy.evaluate(ctx, self.account)
        audit.reasons.extend(decision.reasons)
        if not decision.allowed:
            raise AccessDenied(
                f"{audit.principal or 'anonymous'} is not allowed kms:{action} on "
                f"{audit.key_id or 'this account'}" + (" with this attestation evidence" if attested else ""),
                hint="the audit log (teelab kms audit) lists why each statement did not apply",
            )
        return attested

    def _attest(self, recipient: Recipient, policy: KeyPolicy, audit: Audit) -> Attested:
        now = self.clock()
        try:
            attested = self.verifier(recipient, policy.named_roots(), now)
        except KmsRequestError as exc:
            audit.reasons.append(f"evidence: {exc.message}")
            raise
        again = " (the same document verified before)" if attested.remembered else ""
        audit.reasons.append(f"evidence: {attested.kind} from root {attested.root} verified{again}")
        if attested.timestamp_ms is not None:
            age = now - attested.timestamp_ms / 1000
            if age > self.config.max_evidence_age_s:
                raise refuse(
                    f"attestation document is {age:.0f} s old (limit {self.config.max_evidence_age_s:g} s)"
                )
            if -age > self.config.max_clock_skew_s:
                raise refuse(f"attestation document is dated {-age:.0f} s in the future")
        if attested.nonce is not None:
            digest = hashlib.sha256(attested.kind.encode() + b"\0" + attested.nonce).hexdigest()
            if attested.timestamp_ms is not None:
                expiry = (
                    attested.timestamp_ms / 1000
                    + self.config.max_evidence_age_s
                    + self.config.max_clock_skew_s
                )
            else:
                expiry = now + self.config.nonce_ttl_s
            with self._nonce_lock:  # requests are served on several threads: check and claim at once
                expires = self._nonces.get(digest)
                if expires is not None and expires > now:
                    raise refuse("attestation nonce was already used (replay)", nonce_digest=digest)
                if len(self._nonces) > 100_000:
                    self._nonces = {d: e for d, e in self._nonces.items() if e > now}
                self._nonces[digest] = expiry
            audit.nonce = (digest, expiry)
        return attested

    def _symmetric_blob(self, record: KeyRecord, plaintext: bytes, context: dict[str, str] | None) -> bytes:
        """A ciphertext blob under the key's current material version, after any automatic rotation that
        fell due."""
        self.keyring.rotate_if_due(record.id, self.rotation_clock())
        version = self.keyring.current_version(record.id)
        key = self.keyring.material(record.id, version)
        return material.encrypt_blob(record.id, key, plaintext, context, version)

    @staticmethod
    def _recipient(body: dict[str, Any]) -> Recipient | None:
        return parse_recipient(body["Recipient"]) if body.get("Recipient") is not None else None

    @staticmethod
    def _release(plaintext: bytes, attested: Attested | None, name: str = "Plaintext") -> dict[str, str]:
        """``name``: the plaintext, or CiphertextForRecipient (never the plaintext) given a Recipient."""
        if attested is None:
            return {name: b64(plaintext)}
        try:
            envelope = seal(plaintext, attested.public_key)
        except EnvelopeError as exc:  # an RSA key of the wrong size, or not RSA
            raise EvidenceMalformed(f"attested public key: {exc}") from None
        return {"CiphertextForRecipient": b64(envelope)}
