"""Coded errors of the lab KMS (E10xx); request errors also carry the AWS KMS ``__type`` and HTTP status."""

from __future__ import annotations

from typing import ClassVar

from harness.errors import LabError


class KmsError(LabError):
    code = "E1000"
    title = "KMS internal error"
    explanation = "The lab KMS failed while serving a request; the audit log and the server log say where."
    aws_type: ClassVar[str] = "KMSInternalException"
    http_status: ClassVar[int] = 500


class KmsRequestError(KmsError):
    """A request the KMS refuses (HTTP 4xx): bad input, unknown key, denied access."""

    code = "E1001"
    title = "bad KMS request"
    explanation = "A request to the lab KMS has a value it cannot use; the message names the field."
    exit_status = 2
    aws_type = "ValidationException"
    http_status = 400


class SerializationError(KmsRequestError):
    code = "E1002"
    title = "request body is not the JSON object the operation expects"
    explanation = "The body of a KMS request must be one JSON object (application/x-amz-json-1.1), in UTF-8."
    aws_type = "SerializationException"


class UnknownOperation(KmsRequestError):
    code = "E1003"
    title = "unknown KMS operation"
    explanation = (
        "X-Amz-Target must be TrentService.<Operation> with an operation the lab KMS serves (docs/kms.md "
        "lists them; grants, custom key stores, imported material and multi-Region keys are not served)."
    )
    aws_type = "UnknownOperationException"


class KeyNotFound(KmsRequestError):
    code = "E1004"
    title = "no such KMS key"
    explanation = (
        "The KeyId (key id, key ARN, alias name or alias ARN) names no key in this KMS, or the alias, tag "
        "or policy named does not exist."
    )
    aws_type = "NotFoundException"


class InvalidCiphertext(KmsRequestError):
    code = "E1005"
    title = "ciphertext blob is corrupt or has a different encryption context"
    explanation = (
        "A CiphertextBlob must come from this KMS's Encrypt or GenerateDataKey, unchanged, and be decrypted "
        "with the same EncryptionContext."
    )
    aws_type = "InvalidCiphertextException"


class IncorrectKey(KmsRequestError):
    code = "E1006"
    title = "ciphertext was made under another key"
    explanation = "Decrypt was given a KeyId that differs from the key that encrypted the CiphertextBlob."
    aws_type = "IncorrectKeyException"


class InvalidKeyState(KmsRequestError):
    code = "E1007"
    title = "key state does not allow the operation"
    explanation = (
        "The key is pending deletion (or not pending, for CancelKeyDeletion); a disabled key is "
        "DisabledException (E1030) instead."
    )
    aws_type = "KMSInvalidStateException"


class MalformedPolicy(KmsRequestError):
    code = "E1008"
    title = "malformed key policy"
    explanation = (
        "Key policies are JSON documents shaped like AWS key policies: Statement with Effect, Principal, "
        "Action, optional Resource, Sid and Condition. Unknown operators, keys or fields are refused."
    )
    aws_type = "MalformedPolicyDocumentException"


class AccessDenied(KmsRequestError):
    code = "E1009"
    title = "key policy does not allow the request"
    explanation = (
        "No statement of the key policy allows this principal, action and attestation evidence (or one "
        "denies it); the audit log keeps the reasons. Deny is the default."
    )
    aws_type = "AccessDeniedException"


class InvalidSignature(KmsRequestError):
    code = "E1010"
    title = "SigV4 signature does not match"
    explanation = (
        "The request's AWS Signature Version 4 does not verify with the secret of its access key, is outside "
        "the 15-minute clock window, or is not scoped to the kms service."
    )
    aws_type = "InvalidSignatureException"


class UnrecognizedClient(KmsRequestError):
    code = "E1011"
    title = "unknown access key"
    explanation = (
        "The access key in the Authorization header was not issued by this KMS (teelab kms credentials)."
    )
    aws_type = "UnrecognizedClientException"


class IncompleteSignature(KmsRequestError):
    code = "E1012"
    title = "malformed Authorization header"
    explanation = (
        "Authorization must be 'AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...' and sign "
        "host and every x-amz-* header the request sends (x-amz-date, x-amz-target, x-amz-security-token)."
    )
    aws_type = "IncompleteSignatureException"


class BodyTooLarge(KmsRequestError):
    code = "E1013"
    title = "request body too large"
    explanation = (
        "A KMS request body is capped (64 KiB by default); attestation evidence and 4 KiB plaintexts fit."
    )
    aws_type = "RequestEntityTooLargeException"
    http_status = 413


class EvidenceMalformed(KmsRequestError):
    code = "E1014"
    title = "Recipient evidence cannot be parsed"
    explanation = (
        "Recipient.AttestationDocument must be a Nitro-style attestation document, an SNP report or a TDX "
        "quote (base64); SNP and TDX evidence also need Recipient.PublicKey and Recipient.Nonce."
    )


class EvidenceRefused(AccessDenied):
    code = "E1015"
    title = "Recipient evidence does not verify"
    explanation = (
        "The attestation evidence did not verify: bad signature or chain, a root the key policy does not "
        "name, stale, a replayed nonce, or report_data that does not bind the recipient key and nonce."
    )


class Disabled(KmsRequestError):
    code = "E1030"
    title = "KMS key is disabled"
    explanation = "Cryptographic operations need an enabled key: EnableKey turns a disabled key back on."
    aws_type = "DisabledException"


class AlreadyExists(KmsRequestError):
    code = "E1031"
    title = "alias already exists"
    explanation = "CreateAlias names an alias that exists already; UpdateAlias points an existing alias anew."
    aws_type = "AlreadyExistsException"


class InvalidAliasName(KmsRequestError):
    code = "E1032"
    title = "alias name is not valid"
    explanation = (
        "An alias name is alias/ followed by 1..250 of A-Z a-z 0-9 / _ -, and alias/aws/ is reserved for "
        "AWS managed keys."
    )
    aws_type = "InvalidAliasNameException"


class NotAuthorized(KmsRequestError):
    code = "E1033"
    title = "reserved alias"
    explanation = "Aliases beginning alias/aws/ belong to AWS managed keys: they cannot be made or changed."
    aws_type = "NotAuthorizedException"


class TagError(KmsRequestError):
    code = "E1034"
    title = "tag is not valid"
    explanation = (
        "Tag keys are 1..128 characters and may not begin with aws:, values 0..256; a key holds at most 50 "
        "tags."
    )
    aws_type = "TagException"


class UnsupportedOperation(KmsRequestError):
    code = "E1035"
    title = "operation does not apply to this kind of key"
    explanation = (
        "Rotation applies to symmetric encryption keys only, GetPublicKey to asymmetric keys only, "
        "GenerateDataKeyPair needs a symmetric key."
    )
    aws_type = "UnsupportedOperationException"


class InvalidKeyUsage(KmsRequestError):
    code = "E1036"
    title = "key usage or algorithm does not fit the operation"
    explanation = (
        "Each key has one KeyUsage (ENCRYPT_DECRYPT, SIGN_VERIFY or GENERATE_VERIFY_MAC) and the algorithms "
        "of its KeySpec: DescribeKey lists them. Encrypt with a signing key, Sign with an RSA algorithm on "
        "an ECC key and the like are refused."
    )
    aws_type = "InvalidKeyUsageException"


class InvalidSignatureValue(KmsRequestError):
    code = "E1037"
    title = "signature does not verify"
    explanation = "Verify was given a signature that the key's public key does not verify for the message."
    aws_type = "KMSInvalidSignatureException"


class InvalidMac(KmsRequestError):
    code = "E1038"
    title = "MAC does not verify"
    explanation = "VerifyMac was given a MAC that the HMAC key does not produce for the message."
    aws_type = "KMSInvalidMacException"


class InvalidMarker(KmsRequestError):
    code = "E1039"
    title = "paging marker is not valid"
    explanation = "Marker must be a NextMarker from the previous page of the same listing."
    aws_type = "InvalidMarkerException"


class LimitExceeded(KmsRequestError):
    code = "E1040"
    title = "KMS limit reached"
    explanation = "A key may be rotated on demand at most 10 times; automatic rotation has no such limit."
    aws_type = "LimitExceededException"


class MasterKeyError(KmsError):
    code = "E1020"
    title = "KMS master key unusable"
    explanation = (
        "The master key wraps every key's material: TEELAB_KMS_MASTER_KEY (base64 of 32 bytes), a credential "
        "file named by --master-key-file or TEELAB_KMS_MASTER_KEY_FILE, or the file kms/master.key in the "
        "state dir. It must be 32 bytes (raw or base64), a file must not be open to group or others, and a "
        "different master key cannot unwrap keys made under the old one."
    )
    exit_status = 2


class StoreError(KmsError):
    code = "E1021"
    title = "KMS store unusable"
    explanation = (
        "The KMS SQLite database could not be opened or written (path, permissions, disk, corruption)."
    )


class ServerStartError(KmsError):
    code = "E1022"
    title = "KMS server did not start"
    explanation = (
        "The lab KMS could not listen (address in use, bad socket path, TLS files) or did not get ready."
    )
    exit_status = 2


class KmsClientError(KmsError):
    code = "E1023"
    title = "KMS answered with an error"
    explanation = "A call through the teelab KMS client got an error response; __type and message are kept."


class AuditChainBroken(KmsError):
    code = "E1024"
    title = "KMS audit log was altered"
    explanation = (
        "Each audit row carries an HMAC (keyed from the master key) over the row before it and its own "
        "fields, and a MAC'd head names the last row; teelab kms audit --verify found a row edited, "
        "inserted, removed or missing its chain value, or rows cut from the end."
    )
