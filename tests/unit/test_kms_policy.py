"""Key policies: AWS-shaped documents, strict parsing, deny by default, guards for lab roots and debug."""

from __future__ import annotations

import json
import re

import pytest

from harness.kms.errors import MalformedPolicy
from harness.kms.policy import KeyPolicy, RequestContext, default_policy

ACCOUNT = "000000000000"
USER = f"arn:aws:iam::{ACCOUNT}:user/alice"
PCR0 = "ab" * 48
OTHER = "cd" * 48


def policy(*statements: dict) -> KeyPolicy:
    return KeyPolicy.parse(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


def enclave_claims(pcr0: str = PCR0, root: str = "aws-nitro", debug: bool = False) -> dict:
    return {
        "kms:recipientattestation:imagesha384": pcr0,
        "kms:recipientattestation:pcr0": pcr0,
        "kms:recipientattestation/pcr0": pcr0,
        "teelab:recipientattestation:root": root,
        "teelab:recipientattestation:debug": debug,
    }


def decrypt(claims: dict | None, *, vendor: bool = True, debug: bool = False, principal: str | None = None):
    return RequestContext("kms:Decrypt", principal, claims, vendor_root=vendor, debug=debug)


ALLOW_PCR0 = {
    "Effect": "Allow",
    "Principal": "*",
    "Action": "kms:Decrypt",
    "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCR0.upper()}},
}


def test_pcr0_condition_allows_matching_and_refuses_other_measurement() -> None:
    p = policy(ALLOW_PCR0)
    assert p.evaluate(decrypt(enclave_claims()), ACCOUNT).allowed
    refused = p.evaluate(decrypt(enclave_claims(OTHER)), ACCOUNT)
    assert not refused.allowed
    assert any("does not hold" in r for r in refused.reasons)
    assert refused.reasons[-1] == "no statement allows the request (default deny)"


def test_qingtian_spelling_and_hex_values_match_in_either_case() -> None:
    for value in (PCR0, PCR0.upper(), PCR0[:10].upper() + PCR0[10:]):
        for operator in ("StringEquals", "StringEqualsIgnoreCase"):
            p = policy({**ALLOW_PCR0, "Condition": {operator: {"kms:RecipientAttestation/PCR0": value}}})
            assert p.evaluate(decrypt(enclave_claims()), ACCOUNT).allowed, (operator, value)
        p = policy({**ALLOW_PCR0, "Condition": {"StringNotEquals": {"kms:RecipientAttestation:PCR0": value}}})
        assert not p.evaluate(decrypt(enclave_claims()), ACCOUNT).allowed, value


def test_string_equals_on_a_string_key_is_case_sensitive() -> None:
    claims = {**enclave_claims(), "teelab:recipientattestation:moduleid": "i-Enclave"}
    for value, allowed in (("i-Enclave", True), ("i-enclave", False)):
        p = policy(
            {**ALLOW_PCR0, "Condition": {"StringEquals": {"teelab:RecipientAttestation:ModuleId": value}}}
        )
        assert p.evaluate(decrypt(claims), ACCOUNT).allowed is allowed, value


@pytest.mark.parametrize("value", ["zz" * 48, PCR0[:-1], "", "0x" + PCR0, PCR0 + " ", "ab cd", "\u00e9" * 2])
def test_hex_values_that_are_not_hex_are_refused(value: str) -> None:
    for operator in ("StringEquals", "StringNotEqualsIgnoreCase"):
        condition = {operator: {"teelab:RecipientAttestation:SnpMeasurement": [PCR0, value]}}
        with pytest.raises(MalformedPolicy, match="is not hex"):
            policy({**ALLOW_PCR0, "Condition": condition})


def test_allow_condition_without_evidence_never_matches_even_for_not_operators() -> None:
    p = policy({**ALLOW_PCR0, "Condition": {"StringNotEquals": {"kms:RecipientAttestation:PCR0": OTHER}}})
    assert p.evaluate(decrypt(enclave_claims()), ACCOUNT).allowed
    assert not p.evaluate(decrypt(None), ACCOUNT).allowed


# The rule table of docs/kms.md: does a statement's condition hold, by operator, for a request that carries
# the key (with a value the condition names / does not name) and for one that does not carry it?
# (operator, key, named value, other value, holds when named, holds when other, absent: Allow, absent: Deny)
RULES = [
    ("StringEquals", "kms:RecipientAttestation:PCR0", PCR0, OTHER, True, False, False, False),
    ("StringEqualsIgnoreCase", "kms:RecipientAttestation:PCR0", PCR0, OTHER, True, False, False, False),
    ("StringNotEquals", "kms:RecipientAttestation:PCR0", PCR0, OTHER, False, True, False, True),
    ("StringNotEqualsIgnoreCase", "kms:RecipientAttestation:PCR0", PCR0, OTHER, False, True, False, True),
    ("NumericEquals", "teelab:RecipientAttestation:SnpGuestSvn", 3, 4, True, False, False, False),
    ("NumericNotEquals", "teelab:RecipientAttestation:SnpGuestSvn", 3, 4, False, True, False, True),
    ("NumericLessThan", "teelab:RecipientAttestation:SnpGuestSvn", 3, 2, False, True, False, False),
    ("NumericLessThanEquals", "teelab:RecipientAttestation:SnpGuestSvn", 3, 4, True, False, False, False),
    ("NumericGreaterThan", "teelab:RecipientAttestation:SnpGuestSvn", 3, 4, False, True, False, False),
    ("NumericGreaterThanEquals", "teelab:RecipientAttestation:SnpGuestSvn", 3, 2, True, False, False, False),
    ("Bool", "teelab:RecipientAttestation:Debug", True, False, True, False, False, False),
]


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_rule_table_by_operator_key_present_or_absent_and_effect(rule: tuple) -> None:
    operator, key, named, other, holds_named, holds_other, absent_allow, absent_deny = rule
    condition = {operator: {key: named}}
    claim = key.lower()
    others = {**enclave_claims(), "teelab:recipientattestation:snpguestsvn": 9}
    others.pop(claim, None)
    for claims, allow_applies, deny_applies in [
        ({**others, claim: named}, holds_named, holds_named),
        ({**others, claim: other}, holds_other, holds_other),
        (others, absent_allow, absent_deny),  # evidence without this claim
        (None, absent_allow, absent_deny),  # no evidence at all
    ]:
        debug = claims is not None and claims.get("teelab:recipientattestation:debug") is True
        allow = {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Condition": condition}
        decision = policy(allow).evaluate(decrypt(claims, debug=debug), ACCOUNT)
        assert decision.allowed is allow_applies, (claims, decision.reasons)
        admin = {"Effect": "Allow", "Principal": {"AWS": USER}, "Action": "kms:*"}
        deny = {**allow, "Effect": "Deny"}
        decision = policy(admin, deny).evaluate(decrypt(claims, principal=USER), ACCOUNT)
        assert decision.allowed is not deny_applies, (claims, decision.reasons)


def test_deny_unless_the_enclave_image_refuses_a_plain_decrypt_with_credentials() -> None:
    """Issue 9: a Deny "unless PCR0 is X" used to let a Decrypt without evidence through to the Allow."""
    admin = {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*"}
    unless = {
        "Effect": "Deny",
        "Principal": "*",
        "Action": "kms:Decrypt",
        "Condition": {"StringNotEquals": {"kms:RecipientAttestation:ImageSha384": PCR0}},
    }
    p = policy(admin, ALLOW_PCR0, unless)
    refused = p.evaluate(decrypt(None, principal=USER), ACCOUNT)
    assert not refused.allowed and refused.reasons[-1] == "statement 2 denies"
    assert p.evaluate(decrypt(enclave_claims()), ACCOUNT).allowed
    assert not p.evaluate(decrypt(enclave_claims(OTHER), principal=USER), ACCOUNT).allowed
    encrypt = RequestContext("kms:Encrypt", USER)
    assert p.evaluate(encrypt, ACCOUNT).allowed


def test_a_claim_of_another_type_fails_closed() -> None:
    conditions = [
        {"NumericNotEquals": {"teelab:RecipientAttestation:TdxAttributes": 1}},
        {"NumericLessThan": {"teelab:RecipientAttestation:TdxAttributes": 1}},
        {"StringNotEquals": {"teelab:RecipientAttestation:SnpMeasurement": PCR0}},
        {"Bool": {"teelab:RecipientAttestation:Debug": False}},
    ]
    claims = {
        "teelab:recipientattestation:tdxattributes": "0000001000000000",
        "teelab:recipientattestation:snpmeasurement": 7,
        "teelab:recipientattestation:debug": 0,
    }
    for condition in conditions:
        p = policy({**ALLOW_PCR0, "Condition": condition})
        decision = p.evaluate(decrypt(claims), ACCOUNT)
        assert not decision.allowed, condition
        assert "not a" in decision.reasons[0], decision.reasons
        deny = {"Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Condition": condition}
        unconditional = {k: v for k, v in ALLOW_PCR0.items() if k != "Condition"}
        assert not policy(unconditional, deny).evaluate(decrypt(claims), ACCOUNT).allowed, condition


def test_lab_root_needs_a_statement_that_names_it() -> None:
    lab = enclave_claims(root="lab")
    assert not policy(ALLOW_PCR0).evaluate(decrypt(lab, vendor=False), ACCOUNT).allowed
    naming = {
        **ALLOW_PCR0,
        "Condition": {**ALLOW_PCR0["Condition"], "StringEquals": {"teelab:RecipientAttestation:Root": "lab"}},
    }
    p = policy(naming)
    assert p.named_roots() == {"lab"}
    assert p.evaluate(decrypt(lab, vendor=False), ACCOUNT).allowed
    # naming the root in one statement does not open another statement to it
    other_action = {**ALLOW_PCR0, "Action": "kms:GenerateDataKey"}
    p = policy(naming, other_action)
    gdk = RequestContext("kms:GenerateDataKey", None, lab, vendor_root=False)
    assert not p.evaluate(gdk, ACCOUNT).allowed


def test_debug_enclave_refused_unless_policy_allows_debug() -> None:
    zero = "00" * 48
    any_root = {
        "Effect": "Allow",
        "Principal": "*",
        "Action": "kms:Decrypt",
        "Condition": {"StringEquals": {"teelab:RecipientAttestation:Kind": "nitro"}},
    }
    claims = {**enclave_claims(zero, debug=True), "teelab:recipientattestation:kind": "nitro"}
    refused = policy(any_root).evaluate(decrypt(claims, debug=True), ACCOUNT)
    assert not refused.allowed and any("debug" in r for r in refused.reasons)
    allow_debug = {
        **any_root,
        "Condition": {**any_root["Condition"], "Bool": {"teelab:RecipientAttestation:Debug": "true"}},
    }
    assert policy(allow_debug).evaluate(decrypt(claims, debug=True), ACCOUNT).allowed


def test_explicit_deny_wins_over_allow() -> None:
    deny = {
        "Effect": "Deny",
        "Principal": "*",
        "Action": "kms:*",
        "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": PCR0}},
    }
    decision = policy(ALLOW_PCR0, deny).evaluate(decrypt(enclave_claims()), ACCOUNT)
    assert not decision.allowed and decision.reasons[-1].endswith("denies")


def test_principals_account_root_matches_account_users_not_anonymous() -> None:
    p = KeyPolicy.parse(default_policy(ACCOUNT))
    assert p.evaluate(decrypt(None, principal=USER), ACCOUNT).allowed
    assert not p.evaluate(decrypt(None), ACCOUNT).allowed
    assert not p.evaluate(decrypt(None, principal="arn:aws:iam::111122223333:user/x"), ACCOUNT).allowed
    only_bob = policy(
        {
            "Effect": "Allow",
            "Principal": {"AWS": [f"arn:aws:iam::{ACCOUNT}:user/bob"]},
            "Action": ["kms:Encrypt", "kms:Decrypt"],
        }
    )
    assert not only_bob.evaluate(decrypt(None, principal=USER), ACCOUNT).allowed
    assert only_bob.evaluate(decrypt(None, principal=f"arn:aws:iam::{ACCOUNT}:user/bob"), ACCOUNT).allowed
    assert not only_bob.evaluate(
        RequestContext("kms:PutKeyPolicy", f"arn:aws:iam::{ACCOUNT}:user/bob"), ACCOUNT
    ).allowed


def test_snp_tcb_minimums_are_numeric() -> None:
    p = policy(
        {
            "Effect": "Allow",
            "Principal": "*",
            "Action": "kms:Decrypt",
            "Condition": {
                "NumericGreaterThanEquals": {
                    "teelab:RecipientAttestation:SnpTcbSnp": 8,
                    "teelab:RecipientAttestation:SnpTcbMicrocode": "0xd1",
                },
                "StringEqualsIgnoreCase": {"teelab:RecipientAttestation:SnpMeasurement": PCR0},
            },
        }
    )
    claims = {
        "teelab:recipientattestation:snptcbsnp": 9,
        "teelab:recipientattestation:snptcbmicrocode": 0xD1,
        "teelab:recipientattestation:snpmeasurement": PCR0,
    }
    assert p.evaluate(decrypt(claims), ACCOUNT).allowed
    assert not p.evaluate(decrypt({**claims, "teelab:recipientattestation:snptcbsnp": 7}), ACCOUNT).allowed


def test_number_strings_are_decimal_or_0x_hex() -> None:
    def vmpl_at_most(value: object) -> KeyPolicy:
        return policy(
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "kms:Decrypt",
                "Condition": {"NumericLessThanEquals": {"teelab:RecipientAttestation:SnpVmpl": value}},
            }
        )

    for value in ("07", "0x7", 7):
        p = vmpl_at_most(value)
        assert p.evaluate(decrypt({"teelab:recipientattestation:snpvmpl": 7}), ACCOUNT).allowed, value
        assert not p.evaluate(decrypt({"teelab:recipientattestation:snpvmpl": 8}), ACCOUNT).allowed, value


@pytest.mark.parametrize(
    "document",
    [
        '{"Statement": {"Sid": "\\ud800", "Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt"}}',
        '{"Statement": {"Sid": "\ud800", "Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt"}}',
        '{"\\udfff": 1, "Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt"}}',
    ],
    ids=["escaped", "in the text", "escaped key"],
)
def test_lone_surrogates_are_refused(document: str) -> None:
    """Issue 10: a lone surrogate, escaped in the JSON or in the text itself, cannot be stored or audited."""
    with pytest.raises(MalformedPolicy, match="surrogate"):
        KeyPolicy.parse(document)


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ("[]", "JSON object"),
        ("{", "not JSON"),
        ('{"Statement": []}', "needs a Statement"),
        ('{"Version": "2008-10-17", "Statement": {}}', "Version"),
        (
            '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Extra": 1}}',
            "unsupported",
        ),
        ('{"Statement": {"Effect": "Allow", "Principal": "*", "NotAction": "kms:Decrypt"}}', "unsupported"),
        ('{"Statement": {"Effect": "Maybe", "Principal": "*", "Action": "kms:Decrypt"}}', "Effect"),
        (
            '{"Statement": {"Effect": "Allow", "Principal": {"Service": "x"}, "Action": "kms:Decrypt"}}',
            "Principal",
        ),
        ('{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Fly"}}', "unknown action"),
        (
            '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt",'
            ' "Condition": {"StringLike": {"kms:RecipientAttestation:PCR0": "a*"}}}}',
            "operator",
        ),
        (
            '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt",'
            ' "Condition": {"StringEquals": {"kms:RecipientAttestation:PCR99": "a"}}}}',
            "unknown condition key",
        ),
        (
            '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt",'
            ' "Condition": {"NumericEquals": {"kms:RecipientAttestation:PCR0": 1}}}}',
            "cannot compare",
        ),
        (
            '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt",'
            ' "Condition": {"Bool": {"teelab:RecipientAttestation:Debug": "yes"}}}}',
            "not a bool",
        ),
        ('{"Id": ' + "1" * 5000 + ', "Statement": {}}', "not JSON"),
        (
            '{"Statement": {"Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Effect": "Allow"}}',
            "'Effect' twice",
        ),
        (
            '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Condition": {'
            '"StringEquals": {"kms:RecipientAttestation:PCR0": "aa"},'
            ' "StringEquals": {"kms:RecipientAttestation:PCR1": "bb"}}}}',
            "'StringEquals' twice",
        ),
        (
            '{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Condition": {'
            '"StringEquals": {"kms:RecipientAttestation:PCR0": "aa",'
            ' "kms:recipientattestation:pcr0": "bb"}}}}',
            "names a condition key twice",
        ),
        ('{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:*"}, "Statement": []}', "twice"),
    ],
)
def test_malformed_policies_are_refused_with_a_reason(document: str, complaint: str) -> None:
    with pytest.raises(MalformedPolicy, match=complaint):
        KeyPolicy.parse(document)


@pytest.mark.parametrize(
    ("statement", "suggestion"),
    [
        ('"Efect": "Allow", "Principal": "*", "Action": "kms:Decrypt"', "did you mean 'Effect'?"),
        (
            '"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", '
            '"Condition": {"StringEqual": {"kms:RecipientAttestation:PCR0": "aa"}}',
            "did you mean 'StringEquals'?",
        ),
        (
            '"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", '
            '"Condition": {"StringEquals": {"teelab:RecipientAttestation:SnpMeasurment": "aa"}}',
            "did you mean 'teelab:RecipientAttestation:SnpMeasurement'?",
        ),
    ],
    ids=["field", "operator", "condition-key"],
)
def test_a_misspelt_policy_name_is_refused_with_the_name_it_was_meant_to_be(
    statement: str, suggestion: str
) -> None:
    with pytest.raises(MalformedPolicy, match=re.escape(suggestion)):
        KeyPolicy.parse('{"Version": "2012-10-17", "Statement": [{' + statement + "}]}")


def test_the_key_policies_docs_kms_md_shows_are_valid() -> None:
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "kms.md").read_text()
    examples = [b for b in re.findall(r"```json\n(.*?)```", docs, re.S) if '"Statement"' in b]
    assert len(examples) >= 2
    for example in examples:
        policy = KeyPolicy.parse(re.sub(r"<[^>]+ hex>", "ab" * 48, example))
        assert not any("kms:*" in s.actions and s.principals != ("*",) for s in policy.statements), (
            "an operator statement with kms:* could decrypt without attestation"
        )
