"""Key policies shaped like AWS key policies, with conditions on attestation claims; deny by default.

Small and strict: unknown fields, operators or condition keys, duplicate JSON keys and hex values that are
not hex are refused when the policy is stored. A condition on a key the request does not carry never lets an
Allow apply; in a Deny a negated operator (StringNotEquals..., NumericNotEquals) holds for it, as in AWS, so a
request without evidence meets the Deny. A statement allows evidence from a non-vendor root (a lab CA) or a
debug-mode guest only if it names that root or debug itself.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from harness.kms.errors import MalformedPolicy

MAX_POLICY_BYTES = 32768
OPERATIONS = (
    "CreateKey", "DescribeKey", "ListKeys", "Encrypt", "Decrypt", "GenerateDataKey", "GenerateRandom",
    "GetKeyPolicy", "PutKeyPolicy", "ScheduleKeyDeletion", "CancelKeyDeletion",
    "CreateAlias", "UpdateAlias", "DeleteAlias", "ListAliases", "EnableKey", "DisableKey", "TagResource",
    "UntagResource", "ListResourceTags", "ListKeyPolicies", "GenerateDataKeyWithoutPlaintext", "ReEncrypt",
    "EnableKeyRotation", "DisableKeyRotation", "GetKeyRotationStatus", "RotateKeyOnDemand",
    "ListKeyRotations", "Sign", "Verify", "GetPublicKey", "GenerateMac", "VerifyMac", "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext", "UpdateKeyDescription",
)  # fmt: skip
# Policy actions: one per operation, except ReEncrypt, which needs ReEncryptFrom on its source key and
# ReEncryptTo on its destination. Wildcards ("kms:GenerateDataKey*", "kms:ReEncrypt*") match these names.
ACTIONS = (*(o for o in OPERATIONS if o != "ReEncrypt"), "ReEncryptFrom", "ReEncryptTo")
_ACTION_NAMES = {f"kms:{a}".lower() for a in ACTIONS}

ROOT_KEY = "teelab:RecipientAttestation:Root"
DEBUG_KEY = "teelab:RecipientAttestation:Debug"
VMPL_KEY = "teelab:RecipientAttestation:SnpVmpl"  # VMPL 1-3 only where a statement names it

# Condition keys, by type. AWS's and QingTian's spellings of the enclave keys, then the lab's own.
_NITRO_KEYS = {"kms:RecipientAttestation:ImageSha384": "hex"}
for _n in range(32):
    _NITRO_KEYS[f"kms:RecipientAttestation:PCR{_n}"] = "hex"
    _NITRO_KEYS[f"kms:RecipientAttestation/PCR{_n}"] = "hex"
_LAB_KEYS = {
    ROOT_KEY: "string",
    DEBUG_KEY: "bool",
    "teelab:RecipientAttestation:Kind": "string",
    "teelab:RecipientAttestation:ModuleId": "string",
    "teelab:RecipientAttestation:SnpMeasurement": "hex",
    "teelab:RecipientAttestation:SnpHostData": "hex",
    "teelab:RecipientAttestation:SnpPolicy": "number",
    "teelab:RecipientAttestation:SnpGuestSvn": "number",
    "teelab:RecipientAttestation:SnpVmpl": "number",
    "teelab:RecipientAttestation:SnpTcbBootloader": "number",
    "teelab:RecipientAttestation:SnpTcbTee": "number",
    "teelab:RecipientAttestation:SnpTcbSnp": "number",
    "teelab:RecipientAttestation:SnpTcbMicrocode": "number",
    "teelab:RecipientAttestation:TdxMrtd": "hex",
    "teelab:RecipientAttestation:TdxRtmr0": "hex",
    "teelab:RecipientAttestation:TdxRtmr1": "hex",
    "teelab:RecipientAttestation:TdxRtmr2": "hex",
    "teelab:RecipientAttestation:TdxRtmr3": "hex",
    "teelab:RecipientAttestation:TdxMrConfigId": "hex",
    "teelab:RecipientAttestation:TdxAttributes": "number",
    "teelab:RecipientAttestation:SgxMrEnclave": "hex",
    "teelab:RecipientAttestation:SgxMrSigner": "hex",
    "teelab:RecipientAttestation:SgxIsvProdId": "number",
    "teelab:RecipientAttestation:SgxIsvSvn": "number",
    "teelab:RecipientAttestation:TpmEkFingerprint": "hex",
}
for _n in range(24):  # a vTPM's SHA-256 PCRs (docs/tpm.md)
    _LAB_KEYS[f"teelab:RecipientAttestation:TpmPcr{_n}"] = "hex"
CONDITION_KEYS: dict[str, str] = {k.lower(): t for k, t in {**_NITRO_KEYS, **_LAB_KEYS}.items()}

_STRING_OPS = {"StringEquals", "StringNotEquals", "StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"}
_NUMERIC_OPS = {
    "NumericEquals", "NumericNotEquals", "NumericLessThan", "NumericLessThanEquals", "NumericGreaterThan",
    "NumericGreaterThanEquals",
}  # fmt: skip
_NEGATED_OPS = {"StringNotEquals", "StringNotEqualsIgnoreCase", "NumericNotEquals"}
_OPERATORS = {**dict.fromkeys(_STRING_OPS, "string"), **dict.fromkeys(_NUMERIC_OPS, "number"), "Bool": "bool"}
_STATEMENT_FIELDS = {"Sid", "Effect", "Principal", "Action", "Resource", "Condition"}
_ARN_ACCOUNT = re.compile(r"^arn:aws:iam::(\d{12}):")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


@dataclass(frozen=True)
class Condition:
    operator: str
    key: str  # lower case
    values: tuple[Any, ...]

    def describe(self) -> str:
        return f"{self.operator} {self.key} in {list(self.values)}"


@dataclass(frozen=True)
class Statement:
    index: int
    sid: str
    effect: str  # "Allow" | "Deny"
    principals: tuple[str, ...]  # "*", an account id, or an ARN
    actions: tuple[str, ...]  # lower case, "kms:*" / "*" allowed
    conditions: tuple[Condition, ...]

    @property
    def name(self) -> str:
        return f"statement {self.index}" + (f" ({self.sid})" if self.sid else "")

    def names_key(self, key: str) -> bool:
        return any(c.key == key.lower() for c in self.conditions)


@dataclass(frozen=True)
class RequestContext:
    """What a policy is evaluated against: who asks, for what, and the claims of verified evidence if any."""

    action: str  # e.g. "kms:Decrypt"
    principal: str | None  # an ARN, or None for an unsigned (anonymous) request
    attestation: Mapping[str, Any] | None = None  # lower-case condition key -> value (str, int, bool)
    vendor_root: bool = True  # the evidence chains to a vendor root (AMD, Intel, AWS), not a lab CA
    debug: bool = False  # the evidence comes from a debug-mode guest or enclave


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class KeyPolicy:
    text: str
    statements: tuple[Statement, ...]

    @classmethod
    def parse(cls, text: str) -> KeyPolicy:
        """Parse and check a policy document; MalformedPolicy says what is wrong."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
            raise MalformedPolicy(f"policy is larger than {MAX_POLICY_BYTES} bytes")
        try:
            doc = json.loads(text, object_pairs_hook=_unique_keys)
            json.dumps(doc, ensure_ascii=False).encode()  # its strings end up in audit rows: UTF-8 only
        except MalformedPolicy:
            raise
        except UnicodeEncodeError:
            raise MalformedPolicy("policy holds a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
        except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an over-long integer
            raise MalformedPolicy(f"policy is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise MalformedPolicy("policy must be a JSON object")
        unknown = set(doc) - {"Version", "Id", "Statement"}
        if unknown:
            raise MalformedPolicy(f"policy has unknown fields {sorted(unknown)}")
        if doc.get("Version", "2012-10-17") != "2012-10-17":
            raise MalformedPolicy("policy Version must be 2012-10-17")
        raw = doc.get("Statement")
        if isinstance(raw, dict):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise MalformedPolicy("policy needs a Statement (an object or a non-empty list)")
        return cls(text, tuple(_statement(i, s) for i, s in enumerate(raw)))

    def named_roots(self) -> frozenset[str]:
        """Roots that some Allow statement names in a Root condition: the verifier may accept these too."""
        roots = set()
        for statement in self.statements:
            for cond in statement.conditions:
                if (
                    statement.effect == "Allow"
                    and cond.key == ROOT_KEY.lower()
                    and cond.operator in ("StringEquals", "StringEqualsIgnoreCase")
                ):
                    roots.update(
                        str(v).lower() if "IgnoreCase" in cond.operator else str(v) for v in cond.values
                    )
        return frozenset(roots)

    def evaluate(self, ctx: RequestContext, account: str) -> Decision:
        """Explicit Deny wins, then any Allow, else the default deny; reasons say which statement decided."""
        reasons: list[str] = []
        allowed_by = None
        for statement in self.statements:
            why = _mismatch(statement, ctx, account)
            if why is None:
                if statement.effect == "Deny":
                    return Decision(False, (*reasons, f"{statement.name} denies"))
                allowed_by = allowed_by or statement
            else:
                reasons.append(f"{statement.name}: {why}")
        if allowed_by is not None:
            return Decision(True, (f"{allowed_by.name} allows",))
        return Decision(False, (*reasons, "no statement allows the request (default deny)"))


def default_policy(account: str) -> str:
    """The policy a key gets when CreateKey names none: the account's credentials may do everything."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable lab credentials",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        },
        indent=2,
    )


def measured_snp_policy(operator_arn: str, measurement: str) -> dict[str, Any]:
    """The operator may encrypt; anyone may decrypt who proves, with lab-root SNP evidence of a non-debug
    guest, the launch measurement ``measurement``."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "operator",
                "Effect": "Allow",
                "Principal": {"AWS": operator_arn},
                "Action": ["kms:Encrypt", "kms:DescribeKey"],
                "Resource": "*",
            },
            {
                "Sid": "measured-cvm",
                "Effect": "Allow",
                "Principal": "*",
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {
                    "StringEqualsIgnoreCase": {
                        "teelab:RecipientAttestation:Kind": "snp",
                        "teelab:RecipientAttestation:Root": "lab",
                        "teelab:RecipientAttestation:SnpMeasurement": measurement,
                    },
                    "Bool": {"teelab:RecipientAttestation:Debug": "false"},
                },
            },
        ],
    }


def measured_enclave_policy(operator_arn: str, pcr0: str) -> dict[str, Any]:
    """The operator may encrypt; anyone may decrypt who proves, with a lab-root attestation document of a
    non-debug enclave, the image measurement ``pcr0`` (kms:RecipientAttestation:PCR0, as for Nitro)."""
    policy = measured_snp_policy(operator_arn, "")
    policy["Statement"][1] = {
        "Sid": "measured-enclave",
        "Effect": "Allow",
        "Principal": "*",
        "Action": "kms:Decrypt",
        "Resource": "*",
        "Condition": {
            "StringEqualsIgnoreCase": {
                "kms:RecipientAttestation:PCR0": pcr0,
                "teelab:RecipientAttestation:Root": "lab",
            },
            "Bool": {"teelab:RecipientAttestation:Debug": "false"},
        },
    }
    return policy


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: json would keep the last of two ``Effect``s silently."""
    out = dict(pairs)
    if len(out) != len(pairs):
        twice = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise MalformedPolicy(f"policy names {twice!r} twice in one object")
    return out


def _strings(value: Any, what: str, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise MalformedPolicy(f"{where}: {what} must be a non-empty string or list of strings")
    return tuple(items)


def _statement(index: int, raw: Any) -> Statement:
    where = f"statement {index}"
    if not isinstance(raw, dict):
        raise MalformedPolicy(f"{where} is not an object")
    unknown = set(raw) - _STATEMENT_FIELDS
    if unknown:
        raise MalformedPolicy(
            f"{where} has unsupported fields {sorted(unknown)}{_did_you_mean(unknown, _STATEMENT_FIELDS)}; "
            f"a statement takes {', '.join(sorted(_STATEMENT_FIELDS))} (NotAction etc. are not supported)"
        )
    sid = raw.get("Sid", "")
    if not isinstance(sid, str):
        raise MalformedPolicy(f"{where}: Sid must be a string")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise MalformedPolicy(f"{where}: Effect must be Allow or Deny")
    principal = raw.get("Principal")
    if principal == "*":
        principals: tuple[str, ...] = ("*",)
    elif isinstance(principal, dict) and set(principal) == {"AWS"}:
        principals = _strings(principal["AWS"], "Principal.AWS", where)
    else:
        raise MalformedPolicy(f'{where}: Principal must be "*" or {{"AWS": ARN or list}}')
    actions = tuple(a.lower() for a in _strings(raw.get("Action"), "Action", where))
    for action in actions:
        if not any(fnmatchcase(name, action) for name in _ACTION_NAMES) and action != "*":
            raise MalformedPolicy(f"{where}: unknown action {action!r} (no KMS action matches it)")
    if "Resource" in raw:
        _strings(raw["Resource"], "Resource", where)
    return Statement(index, sid, effect, principals, actions, _conditions(raw.get("Condition", {}), where))


_KEY_NAMES = [*_NITRO_KEYS, *_LAB_KEYS]


def _did_you_mean(given: Iterable[str], known: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest known name to a misspelt one, else nothing."""
    names = {name.lower(): name for name in known}
    for name in given:
        close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.75)
        if close:
            return f" (did you mean {names[close[0]]!r}?)"
    return ""


def _conditions(raw: Any, where: str) -> tuple[Condition, ...]:
    if not isinstance(raw, dict):
        raise MalformedPolicy(f"{where}: Condition must be an object")
    out = []
    for operator, block in raw.items():
        kind = _OPERATORS.get(operator)
        if kind is None:
            raise MalformedPolicy(
                f"{where}: unsupported condition operator {operator!r}"
                f"{_did_you_mean([operator], _OPERATORS)}; operators: {', '.join(sorted(_OPERATORS))}"
            )
        if not isinstance(block, dict) or not block:
            raise MalformedPolicy(f"{where}: {operator} must map condition keys to values")
        if len({key.lower() for key in block}) != len(block):
            raise MalformedPolicy(f"{where}: {operator} names a condition key twice (keys ignore case)")
        for key, value in block.items():
            key_type = CONDITION_KEYS.get(key.lower())
            if key_type is None:
                raise MalformedPolicy(
                    f"{where}: unknown condition key {key!r}{_did_you_mean([key], _KEY_NAMES)} "
                    "(docs/kms.md lists the condition keys)"
                )
            if {"hex": "string"}.get(key_type, key_type) != kind:
                raise MalformedPolicy(f"{where}: {operator} cannot compare {key} (a {key_type} key)")
            values = value if isinstance(value, list) else [value]
            if not values:
                raise MalformedPolicy(f"{where}: {operator} {key} has no values")
            out.append(
                Condition(operator, key.lower(), tuple(_value(v, key_type, where, key) for v in values))
            )
    return tuple(out)


def _number(value: Any) -> int | None:
    """An int, or a string of one in decimal (leading zeros and all, "07") or 0x hex; None otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,20}", value):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"0x[0-9a-fA-F]{1,16}", value):
        return int(value, 16)
    return None


def _boolean(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _value(value: Any, kind: str, where: str, key: str) -> Any:
    """A condition value as its key's type: hex is lower-cased (claims are lower-case hex), numbers int."""
    if kind in ("string", "hex") and isinstance(value, str):
        if kind == "hex" and not _HEX.fullmatch(value):
            raise MalformedPolicy(f"{where}: value {value!r} for {key} is not hex (pairs of 0-9, a-f)")
        return value.lower() if kind == "hex" else value
    converted = _number(value) if kind == "number" else _boolean(value) if kind == "bool" else None
    if converted is None:
        raise MalformedPolicy(f"{where}: value {value!r} for {key} is not a {kind}")
    return converted


def _principal_matches(principals: tuple[str, ...], principal: str | None, account: str) -> bool:
    for p in principals:
        if p == "*":
            return True
        if principal is None:
            continue
        if p in (account, f"arn:aws:iam::{account}:root"):
            match = _ARN_ACCOUNT.match(principal)
            if match and match.group(1) == account:
                return True
        elif p == principal:
            return True
    return False


def _claim_is(value: Any, kind: str) -> bool:
    if kind == "number":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, bool if kind == "bool" else str)


def _condition_holds(cond: Condition, actual: Any) -> bool:
    op = cond.operator
    if op == "Bool":
        return any(actual is v for v in cond.values)
    if op in _STRING_OPS:
        fold = "IgnoreCase" in op
        text = actual.lower() if fold else actual
        hit = any(text == (v.lower() if fold else v) for v in cond.values)
        return not hit if "NotEquals" in op else hit
    compare = {
        "NumericEquals": lambda a, b: a == b,
        "NumericNotEquals": lambda a, b: a != b,
        "NumericLessThan": lambda a, b: a < b,
        "NumericLessThanEquals": lambda a, b: a <= b,
        "NumericGreaterThan": lambda a, b: a > b,
        "NumericGreaterThanEquals": lambda a, b: a >= b,
    }[op]
    if op == "NumericNotEquals":
        return all(compare(actual, v) for v in cond.values)
    return any(compare(actual, v) for v in cond.values)


def _mismatch(statement: Statement, ctx: RequestContext, account: str) -> str | None:
    """Why ``statement`` does not apply to ``ctx``; None when it applies."""
    action = ctx.action.lower()
    if not any(a == action or fnmatchcase(action, a) for a in statement.actions):
        return f"action {ctx.action} not listed"
    if not _principal_matches(statement.principals, ctx.principal, account):
        return f"principal {ctx.principal or 'anonymous'} not listed"
    why = _conditions_mismatch(statement, ctx.attestation)
    if why is None and statement.effect == "Allow" and ctx.attestation is not None:
        why = _evidence_mismatch(statement, ctx, ctx.attestation)
    return why


def _conditions_mismatch(statement: Statement, claims: Mapping[str, Any] | None) -> str | None:
    """The first condition of ``statement`` that does not hold for ``claims``; None when all hold."""
    for cond in statement.conditions:
        if claims is None or cond.key not in claims:
            if statement.effect == "Deny" and cond.operator in _NEGATED_OPS:
                continue  # as in AWS: "the request's value is not X" holds when it has none
            return f"{cond.key} is not in the request (no attestation evidence or no such claim)"
        actual = claims[cond.key]
        kind = _OPERATORS[cond.operator]
        if not _claim_is(actual, kind):  # cannot be compared: fail closed
            if statement.effect == "Allow":
                return f"{cond.key} is {actual!r}, not a {kind}"
            continue
        if not _condition_holds(cond, actual):
            return f"{cond.describe()} does not hold for {actual!r}"
    return None


def _evidence_mismatch(statement: Statement, ctx: RequestContext, claims: Mapping[str, Any]) -> str | None:
    """Why an Allow does not take this evidence: a lab root, debug or VMPL 1-3 it does not name."""
    if not ctx.vendor_root and not statement.names_key(ROOT_KEY):
        return f"evidence chains to root {claims.get(ROOT_KEY.lower())!r}, which the statement does not name"
    if ctx.debug and not statement.names_key(DEBUG_KEY):
        return "evidence comes from a debug-mode guest and the statement does not allow debug"
    vmpl = claims.get(VMPL_KEY.lower())
    if isinstance(vmpl, int) and vmpl > 0 and not statement.names_key(VMPL_KEY):
        return f"the SNP report was requested at VMPL {vmpl} and the statement names no SnpVmpl condition"
    return None
