"""The KMS operations over the store: validation of each field, key policies, Recipient release.

``KmsService.call`` is transport-free: the HTTP layer hands it the operation, the JSON body and the caller,
and gets back the response plus the store change to commit (with the audit row) before it answers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teelab_guest.kms_envelope import EnvelopeError, seal

from harness.kms import material
from harness.kms.errors import (
    AccessDenied,
    EvidenceMalformed,
    IncorrectKey,
    InvalidKeyState,
    KeyNotFound,
    KmsRequestError,
    MalformedPolicy,
    UnknownOperation,
)
from harness.kms.policy import ACTIONS, KeyPolicy, RequestContext, default_policy
from harness.kms.recipient import Attested, Recipient, Verifier, parse_recipient, refuse
from harness.kms.store import KeyRecord, Store

MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_COMMON_FIELDS = {"GrantTokens", "DryRun"}


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


class KmsService:
    def __init__(
        self,
        store: Store,
        verifier: Verifier,
        config: ServiceConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.verifier = verifier
        self.config = config or ServiceConfig()
        self.clock = clock
        self._nonces = store.live_nonces()
        self._nonce_lock = threading.Lock()
        self._policies: dict[str, KeyPolicy] = {}
        self._ops: dict[str, Callable[[dict[str, Any], Audit], Outcome]] = {
            name: getattr(self, "_op_" + name) for name in ACTIONS
        }

    @property
    def account(self) -> str:
        return self.store.account

    def call(self, operation: str, body: Any, audit: Audit) -> Outcome:
        """Serve one request; raises a KmsRequestError subclass when it is refused. Thread-safe: the HTTP
        layer runs calls on a small pool so that OpenSSL work (which releases the GIL) uses a second CPU."""
        op = self._ops.get(operation)
        if op is None:
            raise UnknownOperation(f"unknown operation {operation[:64]!r}")
        if not isinstance(body, dict):
            raise KmsRequestError("the request body must be a JSON object")
        if body.get("DryRun") not in (None, False):
            raise KmsRequestError("DryRun is not supported")
        _optional(body, "GrantTokens", list)
        return op(body, audit)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _policy(self, text: str) -> KeyPolicy:
        policy = self._policies.get(text)
        if policy is None:
            if len(self._policies) > 1024:
                self._policies.clear()
            policy = self._policies[text] = KeyPolicy.parse(text)
        return policy

    def _key(self, key_ref: Any, audit: Audit, *, pending_ok: bool = False) -> KeyRecord:
        key_id = self._key_id(key_ref)
        audit.key_id = key_id
        record = self.store.get_key(key_id, now=self.clock())
        if record is None:
            raise KeyNotFound(f"key {key_id} does not exist", hint="list keys with teelab kms keys")
        if record.state != "Enabled" and not pending_ok:
            raise InvalidKeyState(f"key {record.arn} is {record.state}")
        return record

    def _key_id(self, key_ref: Any) -> str:
        if not isinstance(key_ref, str) or not 1 <= len(key_ref) <= 2048:
            raise KmsRequestError("KeyId must be a string of 1..2048 characters")
        prefix = f"arn:aws:kms:{self.store.region}:{self.account}:key/"
        key_id = key_ref[len(prefix) :] if key_ref.startswith(prefix) else key_ref
        if not _UUID.match(key_id):
            raise KeyNotFound(f"key {key_ref[:128]!r} does not exist (key ids and key ARNs only, no aliases)")
        return key_id

    def _authorize(
        self, policy_text: str, action: str, audit: Audit, recipient: Recipient | None
    ) -> Attested | None:
        """Verify the Recipient (if any) and evaluate ``policy_text``; AccessDenied when it does not allow."""
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
        audit.reasons.append(f"evidence: {attested.kind} from root {attested.root} verified")
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

    def _release(self, plaintext: bytes, attested: Attested | None) -> dict[str, str]:
        """Plaintext, or CiphertextForRecipient (and never the plaintext) when there is a Recipient."""
        if attested is None:
            return {"Plaintext": _b64(plaintext)}
        try:
            envelope = seal(plaintext, attested.public_key)
        except EnvelopeError as exc:  # an RSA key of the wrong size, or not RSA
            raise EvidenceMalformed(f"attested public key: {exc}") from None
        return {"CiphertextForRecipient": _b64(envelope)}

    def _account_policy(self) -> str:
        return self.store.account_policy() or default_policy(self.account)

    # -- operations --------------------------------------------------------------------------------------

    def _op_CreateKey(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(
            body,
            {
                "Policy",
                "Description",
                "KeyUsage",
                "KeySpec",
                "CustomerMasterKeySpec",
                "Origin",
                "Tags",
                "BypassPolicyLockoutSafetyCheck",
                "MultiRegion",
            },
        )
        self._authorize(self._account_policy(), "CreateKey", audit, None)
        text = _optional(body, "Policy", str)
        if text is None:
            text = default_policy(self.account)
        self._policy(text)
        description = _optional(body, "Description", str) or ""
        if len(description) > 8192:
            raise KmsRequestError("Description must be at most 8192 characters")
        _choice(body, "KeyUsage", ("ENCRYPT_DECRYPT",))
        _choice(body, "KeySpec", ("SYMMETRIC_DEFAULT",))
        _choice(body, "CustomerMasterKeySpec", ("SYMMETRIC_DEFAULT",))
        _choice(body, "Origin", ("AWS_KMS",))
        _optional(body, "Tags", list)
        _optional(body, "BypassPolicyLockoutSafetyCheck", bool)
        if _optional(body, "MultiRegion", bool):
            raise KmsRequestError("MultiRegion keys are not supported")
        record, change = self.store.new_key(text, description)
        audit.key_id = record.id
        return Outcome({"KeyMetadata": record.metadata(self.account)}, change)

    def _op_DescribeKey(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"KeyId"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        self._authorize(record.policy, "DescribeKey", audit, None)
        return Outcome({"KeyMetadata": record.metadata(self.account)})

    def _op_ListKeys(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"Limit", "Marker"})
        self._authorize(self._account_policy(), "ListKeys", audit, None)
        limit = _optional(body, "Limit", int)
        limit = 100 if limit is None else limit
        if not 1 <= limit <= 1000:
            raise KmsRequestError("Limit must be 1..1000")
        marker = _optional(body, "Marker", str) or ""
        records = self.store.list_keys(limit + 1, marker)
        response: dict[str, Any] = {
            "Keys": [{"KeyId": r.id, "KeyArn": r.arn} for r in records[:limit]],
            "Truncated": len(records) > limit,
        }
        if len(records) > limit:
            response["NextMarker"] = records[limit - 1].id
        return Outcome(response)

    def _op_Encrypt(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"KeyId", "Plaintext", "EncryptionContext", "EncryptionAlgorithm"})
        record = self._key(body.get("KeyId"), audit)
        plaintext = _blob(body, "Plaintext", MAX_PLAINTEXT, required=True)
        context = _context(body)
        _choice(body, "EncryptionAlgorithm", ("SYMMETRIC_DEFAULT",))
        self._authorize(record.policy, "Encrypt", audit, None)
        blob = material.encrypt_blob(record.id, self.store.material(record.id), plaintext, context)
        return Outcome(
            {"CiphertextBlob": _b64(blob), "KeyId": record.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        )

    def _op_Decrypt(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"KeyId", "CiphertextBlob", "EncryptionContext", "EncryptionAlgorithm", "Recipient"})
        blob = _blob(body, "CiphertextBlob", MAX_CIPHERTEXT, required=True)
        context = _context(body)
        _choice(body, "EncryptionAlgorithm", ("SYMMETRIC_DEFAULT",))
        recipient = parse_recipient(body["Recipient"]) if body.get("Recipient") is not None else None
        blob_key = material.blob_key_id(blob)
        if body.get("KeyId") is not None:
            wanted = self._key_id(body["KeyId"])
            if wanted != blob_key:
                audit.key_id = wanted
                raise IncorrectKey(f"the ciphertext was not made under key {wanted}")
        if not _UUID.match(blob_key):
            raise material.InvalidCiphertext("CiphertextBlob names no valid key id")
        record = self._key(blob_key, audit)
        attested = self._authorize(record.policy, "Decrypt", audit, recipient)
        plaintext = material.decrypt_blob(blob, self.store.material(record.id), context)
        return Outcome(
            {
                "KeyId": record.arn,
                "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                **self._release(plaintext, attested),
            }
        )

    def _op_GenerateDataKey(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"KeyId", "KeySpec", "NumberOfBytes", "EncryptionContext", "Recipient"})
        record = self._key(body.get("KeyId"), audit)
        spec = _choice(body, "KeySpec", ("AES_256", "AES_128"))
        count = _optional(body, "NumberOfBytes", int)
        if (spec is None) == (count is None):
            raise KmsRequestError("GenerateDataKey needs exactly one of KeySpec and NumberOfBytes")
        if count is not None and not 1 <= count <= 1024:
            raise KmsRequestError("NumberOfBytes must be 1..1024")
        size = count or (32 if spec == "AES_256" else 16)
        context = _context(body)
        recipient = parse_recipient(body["Recipient"]) if body.get("Recipient") is not None else None
        attested = self._authorize(record.policy, "GenerateDataKey", audit, recipient)
        data_key = secrets.token_bytes(size)
        blob = material.encrypt_blob(record.id, self.store.material(record.id), data_key, context)
        return Outcome(
            {"CiphertextBlob": _b64(blob), "KeyId": record.arn, **self._release(data_key, attested)}
        )

    def _op_GenerateRandom(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"NumberOfBytes", "CustomKeyStoreId", "Recipient"})
        count = _optional(body, "NumberOfBytes", int)
        count = 32 if count is None else count
        if not 1 <= count <= 1024:
            raise KmsRequestError("NumberOfBytes must be 1..1024")
        if body.get("CustomKeyStoreId") is not None:
            raise KmsRequestError("custom key stores are not supported")
        recipient = parse_recipient(body["Recipient"]) if body.get("Recipient") is not None else None
        attested = self._authorize(self._account_policy(), "GenerateRandom", audit, recipient)
        return Outcome(self._release(secrets.token_bytes(count), attested))

    def _op_GetKeyPolicy(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"KeyId", "PolicyName"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        _choice(body, "PolicyName", ("default",))
        self._authorize(record.policy, "GetKeyPolicy", audit, None)
        return Outcome({"Policy": record.policy, "PolicyName": "default"})

    def _op_PutKeyPolicy(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"KeyId", "PolicyName", "Policy", "BypassPolicyLockoutSafetyCheck"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        _choice(body, "PolicyName", ("default",))
        _optional(body, "BypassPolicyLockoutSafetyCheck", bool)
        text = _optional(body, "Policy", str)
        if text is None:
            raise MalformedPolicy("Policy is required")
        self._authorize(record.policy, "PutKeyPolicy", audit, None)
        self._policy(text)
        return Outcome({}, self.store.set_policy(record.id, text))

    def _op_ScheduleKeyDeletion(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"KeyId", "PendingWindowInDays"})
        record = self._key(body.get("KeyId"), audit)
        days = _optional(body, "PendingWindowInDays", int)
        days = 30 if days is None else days
        if not 7 <= days <= 30:
            raise KmsRequestError("PendingWindowInDays must be 7..30")
        self._authorize(record.policy, "ScheduleKeyDeletion", audit, None)
        when = round(self.clock() + days * 86400, 3)
        return Outcome(
            {
                "KeyId": record.arn,
                "DeletionDate": when,
                "KeyState": "PendingDeletion",
                "PendingWindowInDays": days,
            },
            self.store.set_state(record.id, "PendingDeletion", when),
        )

    def _op_CancelKeyDeletion(self, body: dict[str, Any], audit: Audit) -> Outcome:
        _only(body, {"KeyId"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        if record.state != "PendingDeletion":
            raise InvalidKeyState(f"key {record.arn} is not pending deletion")
        self._authorize(record.policy, "CancelKeyDeletion", audit, None)
        return Outcome({"KeyId": record.arn}, self.store.set_state(record.id, "Enabled", None))


# -- field checks ------------------------------------------------------------------------------------------


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed - _COMMON_FIELDS
    if unknown:
        raise KmsRequestError(f"unknown fields {sorted(str(u)[:64] for u in unknown)[:5]}")


def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise KmsRequestError(f"{name} must be an integer")
    if not isinstance(value, kind):
        raise KmsRequestError(f"{name} must be a {kind.__name__}")
    return value


def _choice(body: dict[str, Any], name: str, choices: tuple[str, ...]) -> str | None:
    value = body.get(name)
    if value is not None and value not in choices:
        raise KmsRequestError(f"{name} must be one of {', '.join(choices)}", given=str(value)[:64])
    return value


def _blob(body: dict[str, Any], name: str, limit: int, *, required: bool = False) -> bytes:
    value = body.get(name)
    if value is None:
        if required:
            raise KmsRequestError(f"{name} is required")
        return b""
    if not isinstance(value, str):
        raise KmsRequestError(f"{name} must be a base64 string")
    if len(value) > (limit + 2) // 3 * 4:
        raise KmsRequestError(f"{name} must be at most {limit} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KmsRequestError(f"{name} is not valid base64") from None
    if not 1 <= len(data) <= limit:
        raise KmsRequestError(f"{name} must be 1..{limit} bytes")
    return data


def _context(body: dict[str, Any]) -> dict[str, str] | None:
    context = body.get("EncryptionContext")
    if context is None:
        return None
    if not isinstance(context, dict) or not all(isinstance(v, str) for v in context.values()):
        raise KmsRequestError("EncryptionContext must map strings to strings")
    if len(json.dumps(context)) > 8192:
        raise KmsRequestError("EncryptionContext is too large")
    return context


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
