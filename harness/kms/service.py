"""The KMS operations over the store: validation of each field, key policies, Recipient release.

``KmsService.call`` is transport-free: the HTTP layer hands it the operation, the JSON body and the caller,
and gets back the response plus the store change to commit (with the audit row) before it answers. This
module serves keys' life and symmetric cryptography; ``ops_keys`` aliases, tags, state and rotation;
``ops_asymmetric`` signing, MACs, public keys and data key pairs.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

from harness.kms import fields, keyspecs, material
from harness.kms.base import KEY_ID, Audit, Outcome, ServiceConfig
from harness.kms.errors import (
    IncorrectKey,
    InvalidCiphertext,
    InvalidKeyState,
    InvalidKeyUsage,
    KeyNotFound,
    KmsRequestError,
    MalformedPolicy,
    UnknownOperation,
)
from harness.kms.fields import b64
from harness.kms.ops_asymmetric import AsymmetricOps
from harness.kms.ops_keys import KeyOps, tag_list
from harness.kms.policy import OPERATIONS, default_policy
from harness.kms.store import KeyRecord

__all__ = ["Audit", "KmsService", "Outcome", "ServiceConfig"]

MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144
_OPERATIONS = frozenset(OPERATIONS)
ENCRYPTION_ALGORITHMS = ("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256")


class KmsService(KeyOps, AsymmetricOps):
    """The lab KMS's operations: each ``_op_<Name>`` method serves the operation of that name."""

    def call(self, operation: str, body: Any, audit: Audit) -> Outcome:
        """Serve one request; raises a KmsRequestError subclass when it is refused. Thread-safe: the HTTP
        layer runs calls on a small pool so that OpenSSL work (which releases the GIL) uses a second CPU."""
        op = getattr(self, "_op_" + operation) if operation in _OPERATIONS else None
        if op is None:
            raise UnknownOperation(f"unknown operation {operation[:64]!r}")
        if not isinstance(body, dict):
            raise KmsRequestError("the request body must be a JSON object")
        if body.get("DryRun") not in (None, False):
            raise KmsRequestError("DryRun is not supported")
        fields.optional(body, "GrantTokens", list)
        return op(body, audit)

    # -- symmetric material --------------------------------------------------------------------------------

    def _symmetric(self, record: KeyRecord, operation: str) -> None:
        if record.key_spec != keyspecs.SYMMETRIC:
            raise InvalidKeyUsage(
                f"{operation} needs a symmetric encryption key; {record.arn} is {record.key_spec}"
            )

    def _seal(
        self, record: KeyRecord, plaintext: bytes, context: dict[str, str] | None, algorithm: str | None
    ) -> tuple[bytes, str]:
        """Ciphertext of ``plaintext`` under ``record`` (its current material version, after any automatic
        rotation that fell due), and the algorithm used."""
        if record.key_usage != keyspecs.ENCRYPT_DECRYPT:
            raise InvalidKeyUsage(f"key {record.arn} is a {record.key_usage} key, not ENCRYPT_DECRYPT")
        if record.key_spec != keyspecs.SYMMETRIC:
            if algorithm is None or algorithm == keyspecs.SYMMETRIC:
                raise InvalidKeyUsage(
                    f"an {record.key_spec} key needs EncryptionAlgorithm RSAES_OAEP_SHA_1 or _256"
                )
            _no_context(context)
            return keyspecs.encrypt(
                record.key_spec, self.store.material(record.id), algorithm, plaintext
            ), algorithm
        if algorithm not in (None, keyspecs.SYMMETRIC):
            raise InvalidKeyUsage(f"{algorithm} is not an algorithm of a symmetric key")
        return self._symmetric_blob(record, plaintext, context), keyspecs.SYMMETRIC

    def _opener(
        self, blob: bytes, key_ref: Any, algorithm: str | None, audit: Audit, name: str = "KeyId"
    ) -> tuple[KeyRecord, Callable[[dict[str, str] | None], bytes]]:
        """The key that made ``blob`` and a function that decrypts it (called once the policy allows)."""
        record = None if key_ref is None else self._key(key_ref, audit, name=name)
        if record is not None and record.key_spec != keyspecs.SYMMETRIC:
            return record, self._asymmetric_opener(record, blob, algorithm)
        header = material.blob_header(blob)
        if record is not None and record.id != header.key_id:
            raise IncorrectKey(f"the ciphertext was not made under key {record.id}")
        if not KEY_ID.match(header.key_id):
            raise InvalidCiphertext("CiphertextBlob names no valid key id")
        record = record or self._key(header.key_id, audit)
        if algorithm not in (None, keyspecs.SYMMETRIC):
            raise InvalidKeyUsage(f"{algorithm} is not an algorithm of a symmetric key")

        def open_symmetric(context: dict[str, str] | None) -> bytes:
            try:
                key = self.keyring.material(record.id, header.version)
            except KeyError:
                raise InvalidCiphertext(
                    f"CiphertextBlob names material version {header.version}, which key {record.id} never had"
                ) from None
            return material.decrypt_blob(blob, key, context, header)

        return record, open_symmetric

    def _asymmetric_opener(
        self, record: KeyRecord, blob: bytes, algorithm: str | None
    ) -> Callable[[dict[str, str] | None], bytes]:
        if record.key_usage != keyspecs.ENCRYPT_DECRYPT:
            raise InvalidKeyUsage(f"key {record.arn} is a {record.key_usage} key, not ENCRYPT_DECRYPT")
        if algorithm is None or algorithm == keyspecs.SYMMETRIC:
            raise InvalidKeyUsage(
                f"an {record.key_spec} key needs EncryptionAlgorithm RSAES_OAEP_SHA_1 or RSAES_OAEP_SHA_256"
            )
        spec, chosen = record.key_spec, algorithm

        def open_asymmetric(context: dict[str, str] | None) -> bytes:
            _no_context(context)
            return keyspecs.decrypt(spec, self.store.material(record.id), chosen, blob)

        return open_asymmetric

    # -- operations --------------------------------------------------------------------------------------

    def _op_CreateKey(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(
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
        text = fields.optional(body, "Policy", str)
        if text is None:
            text = default_policy(self.account)
        self._policy(text)
        description = fields.optional(body, "Description", str) or ""
        if len(description) > 8192:
            raise KmsRequestError("Description must be at most 8192 characters")
        usage = fields.choice(
            body, "KeyUsage", (keyspecs.ENCRYPT_DECRYPT, keyspecs.SIGN_VERIFY, keyspecs.GENERATE_VERIFY_MAC)
        )
        spec = fields.choice(body, "KeySpec", tuple(keyspecs.SPECS))
        legacy = fields.choice(body, "CustomerMasterKeySpec", tuple(keyspecs.SPECS))
        if spec is not None and legacy is not None and spec != legacy:
            raise KmsRequestError("KeySpec and CustomerMasterKeySpec differ (give KeySpec alone)")
        spec = spec or legacy or keyspecs.SYMMETRIC
        usage = usage or keyspecs.ENCRYPT_DECRYPT
        if usage not in keyspecs.SPECS[spec].usages:
            raise KmsRequestError(
                f"KeyUsage {usage} is not valid for KeySpec {spec} "
                f"(it allows {', '.join(keyspecs.SPECS[spec].usages)})"
            )
        fields.choice(body, "Origin", ("AWS_KMS",))
        tags = tag_list(body.get("Tags"), required=False)
        fields.optional(body, "BypassPolicyLockoutSafetyCheck", bool)
        if fields.optional(body, "MultiRegion", bool):
            raise KmsRequestError("MultiRegion keys are not supported")
        record, change = self.store.new_key(text, description, usage, spec, keyspecs.new_material(spec))
        audit.key_id = record.id
        tagging = self.keyring.set_tags(record.id, tags) if tags else None

        def create(conn: Any) -> None:
            change(conn)
            if tagging is not None:
                tagging(conn)

        return Outcome({"KeyMetadata": self._metadata(record)}, create)

    def _op_DescribeKey(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        self._authorize(record.policy, "DescribeKey", audit, None)
        return Outcome({"KeyMetadata": self._metadata(record)})

    def _op_ListKeys(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"Limit", "Marker"})
        self._authorize(self._account_policy(), "ListKeys", audit, None)
        limit = fields.integer(body, "Limit", 1, 1000, 100)
        records = self.store.list_keys(limit + 1, fields.marker(body))
        response: dict[str, Any] = {
            "Keys": [{"KeyId": r.id, "KeyArn": r.arn} for r in records[:limit]],
            "Truncated": len(records) > limit,
        }
        if len(records) > limit:
            response["NextMarker"] = records[limit - 1].id
        return Outcome(response)

    def _op_Encrypt(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Plaintext", "EncryptionContext", "EncryptionAlgorithm"})
        record = self._key(body.get("KeyId"), audit)
        plaintext = fields.blob(body, "Plaintext", MAX_PLAINTEXT, needed=True)
        context = fields.context(body)
        algorithm = fields.choice(body, "EncryptionAlgorithm", ENCRYPTION_ALGORITHMS)
        self._authorize(record.policy, "Encrypt", audit, None)
        blob, algorithm = self._seal(record, plaintext, context, algorithm)
        return Outcome({"CiphertextBlob": b64(blob), "KeyId": record.arn, "EncryptionAlgorithm": algorithm})

    def _op_Decrypt(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(
            body, {"KeyId", "CiphertextBlob", "EncryptionContext", "EncryptionAlgorithm", "Recipient"}
        )
        blob = fields.blob(body, "CiphertextBlob", MAX_CIPHERTEXT, needed=True)
        context = fields.context(body)
        algorithm = fields.choice(body, "EncryptionAlgorithm", ENCRYPTION_ALGORITHMS)
        recipient = self._recipient(body)
        record, opener = self._opener(blob, body.get("KeyId"), algorithm, audit)
        attested = self._authorize(record.policy, "Decrypt", audit, recipient)
        plaintext = opener(context)
        return Outcome(
            {
                "KeyId": record.arn,
                "EncryptionAlgorithm": algorithm or keyspecs.SYMMETRIC,
                **self._release(plaintext, attested),
            }
        )

    def _op_ReEncrypt(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(
            body,
            {
                "CiphertextBlob",
                "SourceEncryptionContext",
                "SourceKeyId",
                "DestinationKeyId",
                "DestinationEncryptionContext",
                "SourceEncryptionAlgorithm",
                "DestinationEncryptionAlgorithm",
            },
        )
        blob = fields.blob(body, "CiphertextBlob", MAX_CIPHERTEXT, needed=True)
        source_context = fields.context(body, "SourceEncryptionContext")
        target_context = fields.context(body, "DestinationEncryptionContext")
        source_algorithm = fields.choice(body, "SourceEncryptionAlgorithm", ENCRYPTION_ALGORITHMS)
        target_algorithm = fields.choice(body, "DestinationEncryptionAlgorithm", ENCRYPTION_ALGORITHMS)
        if body.get("DestinationKeyId") is None:
            raise KmsRequestError("DestinationKeyId is required")
        source, opener = self._opener(blob, body.get("SourceKeyId"), source_algorithm, audit, "SourceKeyId")
        self._authorize(source.policy, "ReEncryptFrom", audit, None)
        target = self._key(body["DestinationKeyId"], audit, name="DestinationKeyId")
        self._authorize(target.policy, "ReEncryptTo", audit, None)
        audit.reasons.append(f"re-encrypted from key {source.id}")
        plaintext = opener(source_context)
        sealed, target_algorithm = self._seal(target, plaintext, target_context, target_algorithm)
        return Outcome(
            {
                "CiphertextBlob": b64(sealed),
                "SourceKeyId": source.arn,
                "KeyId": target.arn,
                "SourceEncryptionAlgorithm": source_algorithm or keyspecs.SYMMETRIC,
                "DestinationEncryptionAlgorithm": target_algorithm,
            }
        )

    def _data_key(
        self, body: dict[str, Any], audit: Audit, action: str
    ) -> tuple[KeyRecord, bytes, bytes, Any]:
        """GenerateDataKey(WithoutPlaintext)'s shared part: (key, data key, its ciphertext, attested)."""
        record = self._key(body.get("KeyId"), audit)
        spec = fields.choice(body, "KeySpec", ("AES_256", "AES_128"))
        count = fields.optional(body, "NumberOfBytes", int)
        if (spec is None) == (count is None):
            raise KmsRequestError(f"{action} needs exactly one of KeySpec and NumberOfBytes")
        if count is not None and not 1 <= count <= 1024:
            raise KmsRequestError("NumberOfBytes must be 1..1024")
        size = count or (32 if spec == "AES_256" else 16)
        context = fields.context(body)
        recipient = self._recipient(body)
        self._symmetric(record, action)
        attested = self._authorize(record.policy, action, audit, recipient)
        data_key = secrets.token_bytes(size)
        blob, _ = self._seal(record, data_key, context, None)
        return record, data_key, blob, attested

    def _op_GenerateDataKey(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "KeySpec", "NumberOfBytes", "EncryptionContext", "Recipient"})
        record, data_key, blob, attested = self._data_key(body, audit, "GenerateDataKey")
        return Outcome(
            {"CiphertextBlob": b64(blob), "KeyId": record.arn, **self._release(data_key, attested)}
        )

    def _op_GenerateDataKeyWithoutPlaintext(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "KeySpec", "NumberOfBytes", "EncryptionContext"})
        record, _, blob, _ = self._data_key(body, audit, "GenerateDataKeyWithoutPlaintext")
        return Outcome({"CiphertextBlob": b64(blob), "KeyId": record.arn})

    def _op_GenerateRandom(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"NumberOfBytes", "CustomKeyStoreId", "Recipient"})
        count = fields.integer(body, "NumberOfBytes", 1, 1024, 32)
        if body.get("CustomKeyStoreId") is not None:
            raise KmsRequestError("custom key stores are not supported")
        recipient = self._recipient(body)
        attested = self._authorize(self._account_policy(), "GenerateRandom", audit, recipient)
        return Outcome(self._release(secrets.token_bytes(count), attested))

    def _op_GetKeyPolicy(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "PolicyName"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        _policy_name(body)
        self._authorize(record.policy, "GetKeyPolicy", audit, None)
        return Outcome({"Policy": record.policy, "PolicyName": "default"})

    def _op_PutKeyPolicy(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "PolicyName", "Policy", "BypassPolicyLockoutSafetyCheck"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        _policy_name(body)
        fields.optional(body, "BypassPolicyLockoutSafetyCheck", bool)
        text = fields.optional(body, "Policy", str)
        if text is None:
            raise MalformedPolicy("Policy is required")
        self._authorize(record.policy, "PutKeyPolicy", audit, None)
        self._policy(text)
        return Outcome({}, self.store.set_policy(record.id, text))

    def _op_ListKeyPolicies(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Limit", "Marker"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        fields.integer(body, "Limit", 1, 1000, 100)
        fields.marker(body)
        self._authorize(record.policy, "ListKeyPolicies", audit, None)
        return Outcome({"PolicyNames": ["default"], "Truncated": False})

    def _op_ScheduleKeyDeletion(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "PendingWindowInDays"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        if record.state == "PendingDeletion":
            raise InvalidKeyState(f"key {record.arn} is already pending deletion")
        days = fields.integer(body, "PendingWindowInDays", 7, 30, 30)
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
        """As in AWS, the key comes back disabled: EnableKey makes it usable again."""
        fields.only(body, {"KeyId"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        if record.state != "PendingDeletion":
            raise InvalidKeyState(f"key {record.arn} is not pending deletion")
        self._authorize(record.policy, "CancelKeyDeletion", audit, None)
        return Outcome({"KeyId": record.arn}, self.store.set_state(record.id, "Disabled", None))


def _policy_name(body: dict[str, Any]) -> None:
    """PolicyName as AWS takes it: 1..128 word characters (else ValidationException), and a key has only the
    policy named ``default`` (another name: NotFoundException)."""
    name = fields.text(body, "PolicyName", 1, 128)
    if name is not None and not re.fullmatch(r"\w+", name):
        raise KmsRequestError("PolicyName must be word characters")
    if name not in (None, "default"):
        raise KeyNotFound(f"the key has no policy named {name!r}; its one policy is named default")


def _no_context(context: dict[str, str] | None) -> None:
    """An RSA ciphertext cannot bind an encryption context: refuse one rather than ignore it (as AWS does)."""
    if context:
        raise KmsRequestError("EncryptionContext is supported only with symmetric encryption keys")
