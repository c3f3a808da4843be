"""KMS operations of asymmetric and HMAC keys: Sign, Verify, GetPublicKey, GenerateMac, VerifyMac, and the
data key pairs a symmetric key protects (GenerateDataKeyPair, GenerateDataKeyPairWithoutPlaintext)."""

from __future__ import annotations

import hmac
from typing import Any

from harness.kms import fields, keyspecs
from harness.kms.base import Audit, Outcome, ServiceBase
from harness.kms.errors import (
    InvalidKeyUsage,
    InvalidMac,
    InvalidSignatureValue,
    KmsRequestError,
    UnsupportedOperation,
)
from harness.kms.fields import b64
from harness.kms.store import KeyRecord

MAX_SIGNATURE = 6144


class AsymmetricOps(ServiceBase):
    def _usable(self, body: dict[str, Any], audit: Audit, usage: str) -> KeyRecord:
        record = self._key(body.get("KeyId"), audit)
        if record.key_usage != usage:
            raise InvalidKeyUsage(f"key {record.arn} is a {record.key_usage} key, not {usage}")
        return record

    def _signing(self, body: dict[str, Any], audit: Audit) -> tuple[KeyRecord, bytes, str, str]:
        record = self._usable(body, audit, keyspecs.SIGN_VERIFY)
        message = fields.blob(body, "Message", keyspecs.MAX_MESSAGE, needed=True)
        message_type = fields.choice(body, "MessageType", ("RAW", "DIGEST")) or "RAW"
        algorithm = fields.choice(body, "SigningAlgorithm", keyspecs.ALL_SIGNING)
        if algorithm is None:
            raise KmsRequestError("SigningAlgorithm is required")
        return record, message, message_type, algorithm

    def _op_Sign(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Message", "MessageType", "SigningAlgorithm"})
        record, message, message_type, algorithm = self._signing(body, audit)
        self._authorize(record.policy, "Sign", audit, None)
        signature = keyspecs.sign(
            record.key_spec, self.store.material(record.id), algorithm, message, message_type
        )
        return Outcome({"KeyId": record.arn, "Signature": b64(signature), "SigningAlgorithm": algorithm})

    def _op_Verify(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Message", "MessageType", "Signature", "SigningAlgorithm"})
        record, message, message_type, algorithm = self._signing(body, audit)
        signature = fields.blob(body, "Signature", MAX_SIGNATURE, needed=True)
        self._authorize(record.policy, "Verify", audit, None)
        key = self.store.material(record.id)
        if not keyspecs.verify(record.key_spec, key, algorithm, message, message_type, signature):
            raise InvalidSignatureValue(
                f"the signature does not verify with key {record.arn} and {algorithm}"
            )
        return Outcome({"KeyId": record.arn, "SignatureValid": True, "SigningAlgorithm": algorithm})

    def _op_GetPublicKey(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId"})
        record = self._key(body.get("KeyId"), audit)
        if not keyspecs.is_asymmetric(record.key_spec):
            raise UnsupportedOperation(f"key {record.arn} is {record.key_spec}: it has no public key")
        self._authorize(record.policy, "GetPublicKey", audit, None)
        public = keyspecs.public_der(keyspecs.load_private(self.store.material(record.id)))
        return Outcome(
            {
                "KeyId": record.arn,
                "PublicKey": b64(public),
                "CustomerMasterKeySpec": record.key_spec,
                "KeySpec": record.key_spec,
                "KeyUsage": record.key_usage,
                **keyspecs.SPECS[record.key_spec].algorithms(record.key_usage),
            }
        )

    def _mac(self, body: dict[str, Any], audit: Audit, action: str) -> tuple[KeyRecord, bytes]:
        record = self._usable(body, audit, keyspecs.GENERATE_VERIFY_MAC)
        message = fields.blob(body, "Message", keyspecs.MAX_MESSAGE, needed=True)
        algorithm = fields.choice(body, "MacAlgorithm", keyspecs.ALL_MAC)
        if algorithm is None:
            raise KmsRequestError("MacAlgorithm is required")
        self._authorize(record.policy, action, audit, None)
        return record, keyspecs.mac(record.key_spec, self.store.material(record.id), algorithm, message)

    def _op_GenerateMac(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Message", "MacAlgorithm"})
        record, mac = self._mac(body, audit, "GenerateMac")
        return Outcome({"KeyId": record.arn, "Mac": b64(mac), "MacAlgorithm": body["MacAlgorithm"]})

    def _op_VerifyMac(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Message", "MacAlgorithm", "Mac"})
        given = fields.blob(body, "Mac", MAX_SIGNATURE, needed=True)
        record, mac = self._mac(body, audit, "VerifyMac")
        if not hmac.compare_digest(mac, given):
            raise InvalidMac(f"the MAC does not verify with key {record.arn}")
        return Outcome({"KeyId": record.arn, "MacValid": True, "MacAlgorithm": body["MacAlgorithm"]})

    def _key_pair(
        self, body: dict[str, Any], audit: Audit, action: str
    ) -> tuple[KeyRecord, dict[str, Any], bytes, Any]:
        """GenerateDataKeyPair(WithoutPlaintext)'s shared part: (key, response, private DER, attested)."""
        record = self._key(body.get("KeyId"), audit)
        spec = fields.choice(body, "KeyPairSpec", keyspecs.DATA_KEY_PAIR_SPECS)
        if spec is None:
            raise KmsRequestError("KeyPairSpec is required")
        context = fields.context(body)
        recipient = self._recipient(body)
        if record.key_spec != keyspecs.SYMMETRIC or record.key_usage != keyspecs.ENCRYPT_DECRYPT:
            raise InvalidKeyUsage(
                f"{action} needs a symmetric encryption key; {record.arn} is {record.key_spec}"
            )
        attested = self._authorize(record.policy, action, audit, recipient)
        private = keyspecs.generate_private(spec)
        der = keyspecs.private_der(private)
        blob = self._symmetric_blob(record, der, context)
        response = {
            "PrivateKeyCiphertextBlob": b64(blob),
            "PublicKey": b64(keyspecs.public_der(private)),
            "KeyId": record.arn,
            "KeyPairSpec": spec,
        }
        return record, response, der, attested

    def _op_GenerateDataKeyPair(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "KeyPairSpec", "EncryptionContext", "Recipient"})
        _, response, der, attested = self._key_pair(body, audit, "GenerateDataKeyPair")
        return Outcome({**response, **self._release(der, attested, "PrivateKeyPlaintext")})

    def _op_GenerateDataKeyPairWithoutPlaintext(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "KeyPairSpec", "EncryptionContext"})
        _, response, _, _ = self._key_pair(body, audit, "GenerateDataKeyPairWithoutPlaintext")
        return Outcome(response)
