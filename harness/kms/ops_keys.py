"""KMS operations on keys as objects: aliases, tags, enabling and disabling, and rotation of material."""

from __future__ import annotations

import re
from typing import Any

from harness.kms import fields, keyspecs
from harness.kms.base import ALIAS_PREFIX, Audit, Outcome, ServiceBase
from harness.kms.errors import (
    InvalidAliasName,
    InvalidKeyState,
    InvalidMarker,
    KeyNotFound,
    KmsRequestError,
    LimitExceeded,
    NotAuthorized,
    TagError,
    UnsupportedOperation,
)
from harness.kms.keyring import DAY_S
from harness.kms.store import KeyRecord

MAX_TAGS = 50
MAX_ON_DEMAND_ROTATIONS = 10  # per key, as AWS allows
_MODEL_PATTERN = re.compile(r"^[a-zA-Z0-9:/_-]+$")


def tag_list(raw: Any, *, required: bool = True) -> list[tuple[str, str]]:
    """Tags as (key, value) pairs; TagException for keys AWS refuses (aws: prefix), ValidationException for
    values of the wrong shape."""
    if raw is None:
        if required:
            raise KmsRequestError("Tags is required")
        return []
    if not isinstance(raw, list) or len(raw) > MAX_TAGS:
        raise KmsRequestError(f"Tags must be a list of at most {MAX_TAGS} tags")
    tags: dict[str, str] = {}
    for tag in raw:
        if not isinstance(tag, dict) or set(tag) != {"TagKey", "TagValue"}:
            raise KmsRequestError("each tag is {TagKey, TagValue}")
        key, value = tag["TagKey"], tag["TagValue"]
        if not isinstance(key, str) or not 1 <= len(key) <= 128:
            raise KmsRequestError("TagKey must be 1..128 characters")
        if not isinstance(value, str) or len(value) > 256:
            raise KmsRequestError("TagValue must be 0..256 characters")
        if key.lower().startswith("aws:"):
            raise TagError(f"tag key {key[:128]!r} begins with aws:, which is reserved for AWS")
        if key in tags:
            raise TagError(f"tag key {key!r} is given twice")
        tags[key] = value
    return list(tags.items())


def alias_name(body: dict[str, Any]) -> str:
    """AliasName as AWS checks it: the API model's length and characters (ValidationException), then the
    alias/ prefix, the reserved alias/aws/ (NotAuthorizedException) and no ':' (InvalidAliasNameException)."""
    name = fields.text(body, "AliasName", 1, 256, needed=True)
    assert name is not None
    if not _MODEL_PATTERN.match(name):
        raise KmsRequestError(f"AliasName must match {_MODEL_PATTERN.pattern}")
    if not name.startswith(ALIAS_PREFIX) or name == ALIAS_PREFIX:
        raise KmsRequestError("AliasName must be alias/ followed by a name")
    if name.startswith("alias/aws/"):
        raise NotAuthorized(f"{name} is reserved for AWS managed keys (alias/aws/...)")
    if ":" in name:
        raise InvalidAliasName(f"alias name {name!r} may not hold ':'")
    return name


def _page(body: dict[str, Any], high: int, default: int) -> tuple[int, str]:
    """Limit (1..``high``, AWS's ``default``) and Marker of a listing."""
    return fields.integer(body, "Limit", 1, high, default), fields.marker(body)


class KeyOps(ServiceBase):
    # -- aliases ---------------------------------------------------------------------------------------------

    def _alias_arn(self, name: str) -> str:
        return f"arn:aws:kms:{self.store.region}:{self.account}:{name}"

    def _target(self, body: dict[str, Any], audit: Audit) -> KeyRecord:
        ref = body.get("TargetKeyId")
        if isinstance(ref, str) and (ref.startswith(ALIAS_PREFIX) or ":alias/" in ref):
            raise KmsRequestError("TargetKeyId must be a key id or key ARN, not an alias")
        record = self._key(ref, audit, pending_ok=True, name="TargetKeyId")
        if record.state == "PendingDeletion":
            raise InvalidKeyState(f"key {record.arn} is pending deletion")
        return record

    def _op_CreateAlias(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"AliasName", "TargetKeyId"})
        name = alias_name(body)
        record = self._target(body, audit)
        self._authorize(record.policy, "CreateAlias", audit, None)
        return Outcome({}, self.keyring.put_alias(name, record.id, self.clock(), create=True))

    def _op_UpdateAlias(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"AliasName", "TargetKeyId"})
        name = alias_name(body)
        alias = self.keyring.alias(name)
        if alias is None:
            raise KeyNotFound(f"alias {name} does not exist")
        record = self._target(body, audit)
        old = self._key(alias.key_id, audit, pending_ok=True)
        if (old.key_usage, old.key_spec) != (record.key_usage, record.key_spec):
            raise KmsRequestError(
                f"alias {name} names a {old.key_spec} {old.key_usage} key; its new key must be of the same "
                f"spec and usage, not {record.key_spec} {record.key_usage}"
            )
        self._authorize(old.policy, "UpdateAlias", audit, None)
        audit.key_id = record.id
        self._authorize(record.policy, "UpdateAlias", audit, None)
        return Outcome({}, self.keyring.put_alias(name, record.id, self.clock(), create=False))

    def _op_DeleteAlias(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"AliasName"})
        name = alias_name(body)
        alias = self.keyring.alias(name)
        if alias is None:
            raise KeyNotFound(f"alias {name} does not exist")
        record = self._key(alias.key_id, audit, pending_ok=True)
        self._authorize(record.policy, "DeleteAlias", audit, None)
        return Outcome({}, self.keyring.delete_alias(name))

    def _op_ListAliases(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Limit", "Marker"})
        limit, marker = _page(body, 100, 50)
        if marker and not marker.startswith(ALIAS_PREFIX):
            raise InvalidMarker("Marker must be the NextMarker of the previous page")
        key_id = None
        if body.get("KeyId") is not None:
            key_id = self._key(body["KeyId"], audit, pending_ok=True).id
        self._authorize(self._account_policy(), "ListAliases", audit, None)
        aliases = self.keyring.aliases(key_id, limit + 1, marker)
        response: dict[str, Any] = {
            "Aliases": [
                {
                    "AliasName": a.name,
                    "AliasArn": self._alias_arn(a.name),
                    "TargetKeyId": a.key_id,
                    "CreationDate": a.created,
                    "LastUpdatedDate": a.updated,
                }
                for a in aliases[:limit]
            ],
            "Truncated": len(aliases) > limit,
        }
        if len(aliases) > limit:
            response["NextMarker"] = aliases[limit - 1].name
        return Outcome(response)

    # -- state and tags --------------------------------------------------------------------------------------

    def _not_pending(self, body: dict[str, Any], audit: Audit) -> KeyRecord:
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        if record.state == "PendingDeletion":
            raise InvalidKeyState(f"key {record.arn} is pending deletion")
        return record

    def _op_EnableKey(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId"})
        record = self._not_pending(body, audit)
        self._authorize(record.policy, "EnableKey", audit, None)
        return Outcome({}, self.store.set_state(record.id, "Enabled", None))

    def _op_DisableKey(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId"})
        record = self._not_pending(body, audit)
        self._authorize(record.policy, "DisableKey", audit, None)
        return Outcome({}, self.store.set_state(record.id, "Disabled", None))

    def _op_UpdateKeyDescription(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Description"})
        record = self._not_pending(body, audit)
        description = fields.text(body, "Description", 0, 8192, needed=True)
        assert description is not None
        self._authorize(record.policy, "UpdateKeyDescription", audit, None)
        return Outcome({}, self.keyring.set_description(record.id, description))

    def _op_TagResource(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Tags"})
        record = self._not_pending(body, audit)
        tags = tag_list(body.get("Tags"))
        self._authorize(record.policy, "TagResource", audit, None)
        if len(dict(self.keyring.tags(record.id)) | dict(tags)) > MAX_TAGS:
            raise TagError(f"a key holds at most {MAX_TAGS} tags")
        return Outcome({}, self.keyring.set_tags(record.id, tags))

    def _op_UntagResource(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "TagKeys"})
        record = self._not_pending(body, audit)
        keys = fields.required(body, "TagKeys", list)
        if len(keys) > MAX_TAGS or not all(isinstance(k, str) and 1 <= len(k) <= 128 for k in keys):
            raise KmsRequestError(f"TagKeys must be at most {MAX_TAGS} keys of 1..128 characters")
        self._authorize(record.policy, "UntagResource", audit, None)
        return Outcome({}, self.keyring.remove_tags(record.id, keys))

    def _op_ListResourceTags(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Limit", "Marker"})
        record = self._key(body.get("KeyId"), audit, pending_ok=True)
        limit, marker = _page(body, 50, 50)
        self._authorize(record.policy, "ListResourceTags", audit, None)
        tags = [t for t in self.keyring.tags(record.id) if t[0] > marker]
        response: dict[str, Any] = {
            "Tags": [{"TagKey": k, "TagValue": v} for k, v in tags[:limit]],
            "Truncated": len(tags) > limit,
        }
        if len(tags) > limit:
            response["NextMarker"] = tags[limit - 1][0]
        return Outcome(response)

    # -- rotation --------------------------------------------------------------------------------------------

    def _rotatable(self, body: dict[str, Any], audit: Audit, *, pending_ok: bool = False) -> KeyRecord:
        record = self._key(body.get("KeyId"), audit, pending_ok=pending_ok)
        if record.key_spec != keyspecs.SYMMETRIC:
            raise UnsupportedOperation(
                f"only symmetric encryption keys rotate; {record.arn} is {record.key_spec}"
            )
        return record

    def _op_EnableKeyRotation(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "RotationPeriodInDays"})
        record = self._rotatable(body, audit)
        days = fields.integer(body, "RotationPeriodInDays", 90, 2560, 365)
        self._authorize(record.policy, "EnableKeyRotation", audit, None)
        due = self.rotation_clock() + days * DAY_S
        return Outcome({}, self.keyring.set_schedule(record.id, days, due))

    def _op_DisableKeyRotation(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId"})
        record = self._rotatable(body, audit)
        self._authorize(record.policy, "DisableKeyRotation", audit, None)
        return Outcome({}, self.keyring.set_schedule(record.id, None))

    def _op_GetKeyRotationStatus(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId"})
        record = self._rotatable(body, audit, pending_ok=True)
        self._authorize(record.policy, "GetKeyRotationStatus", audit, None)
        if record.state == "Enabled":
            self.keyring.rotate_if_due(record.id, self.rotation_clock())
        schedule = self.keyring.schedule(record.id)
        response: dict[str, Any] = {"KeyId": record.arn, "KeyRotationEnabled": schedule is not None}
        if schedule is not None:
            response["RotationPeriodInDays"], response["NextRotationDate"] = schedule
        return Outcome(response)

    def _op_RotateKeyOnDemand(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId"})
        record = self._rotatable(body, audit)
        self._authorize(record.policy, "RotateKeyOnDemand", audit, None)
        made = sum(r.kind == "ON_DEMAND" for r in self.keyring.rotations(record.id))
        if made >= MAX_ON_DEMAND_ROTATIONS:
            raise LimitExceeded(f"key {record.arn} has had its {MAX_ON_DEMAND_ROTATIONS} on-demand rotations")
        return Outcome(
            {"KeyId": record.arn}, self.keyring.rotate(record.id, self.rotation_clock(), "ON_DEMAND")
        )

    def _op_ListKeyRotations(self, body: dict[str, Any], audit: Audit) -> Outcome:
        fields.only(body, {"KeyId", "Limit", "Marker"})
        record = self._rotatable(body, audit, pending_ok=True)
        limit, marker = _page(body, 1000, 100)
        if marker and not marker.isdigit():
            raise InvalidMarker("Marker must be the NextMarker of the previous page")
        self._authorize(record.policy, "ListKeyRotations", audit, None)
        rotations = [r for r in self.keyring.rotations(record.id) if r.version > int(marker or 0)]
        response: dict[str, Any] = {
            "Rotations": [
                {"KeyId": record.id, "RotationDate": r.created, "RotationType": r.kind}
                for r in rotations[:limit]
            ],
            "Truncated": len(rotations) > limit,
        }
        if len(rotations) > limit:
            response["NextMarker"] = str(rotations[limit - 1].version)
        return Outcome(response)
