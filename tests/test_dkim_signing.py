"""The DKIM stage signs what receivers verify, exactly as stock dkimpy would, with the tenant's keys."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from schemas.tenant import Dkim
from tests.support.dkim import MESSAGES, dkimpy_verify, perl_verify, plain
from worker.errors import ConfigurationError, PermanentError
from worker.job.signature import (
    OVERSIGNED_HEADERS,
    SIGNED_HEADERS,
    DkimSigner,
    PrivateKey,
    SigningKey,
    load_key,
    load_private_key,
    load_signer,
    sign_message,
)
from worker.tools.dkim_keys import dns_record, generate_private_key, private_key_pem

DOMAIN = "acme.example"
NOW = 1772442000


@pytest.fixture(scope="module")
def rsa_key() -> PrivateKey:
    return generate_private_key("rsa", 2048)


@pytest.fixture(scope="module")
def ed25519_key() -> PrivateKey:
    return generate_private_key("ed25519")


def signer(*keys: tuple[str, PrivateKey]) -> DkimSigner:
    return DkimSigner(tuple(SigningKey(DOMAIN.encode(), s.encode(), k) for s, k in keys))


def stock_dkimpy_signature(
    message: bytes, selector: str, key: PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> bytes:
    """What unmodified dkimpy's DKIM.sign returns with our header policy at time NOW."""
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm, material = b"rsa-sha256", private_key_pem(key)
    else:
        algorithm = b"ed25519-sha256"
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        material = base64.b64encode(raw)
    monkeypatch.setattr(dkim.time, "time", lambda: NOW + 0.5)
    d = dkim.DKIM(message, signature_algorithm=algorithm)
    d.should_sign = set(SIGNED_HEADERS)
    d.frozen_sign = set(OVERSIGNED_HEADERS)
    relaxed = (b"relaxed", b"relaxed")
    signature: bytes = d.sign(selector.encode(), DOMAIN.encode(), material, canonicalize=relaxed)
    return signature


@pytest.mark.parametrize("make_message", MESSAGES.values(), ids=MESSAGES.keys())
def test_rsa_signature_verifies_with_dkimpy_and_mail_dkim(
    make_message: Callable[[], bytes], rsa_key: PrivateKey
) -> None:
    signed = sign_message(make_message(), signer(("s2026", rsa_key)))
    record = dns_record(DOMAIN, "s2026", rsa_key)

    assert dkimpy_verify(signed, record) == [True]
    verdict = perl_verify(signed, record)
    assert verdict.overall == "pass", verdict
    assert [s["result"] for s in verdict.signatures] == ["pass"]


@pytest.mark.parametrize("make_message", MESSAGES.values(), ids=MESSAGES.keys())
def test_ed25519_signature_verifies_with_dkimpy(
    make_message: Callable[[], bytes], ed25519_key: PrivateKey
) -> None:
    signed = sign_message(make_message(), signer(("e2026", ed25519_key)))

    assert b"a=ed25519-sha256" in signed
    assert dkimpy_verify(signed, dns_record(DOMAIN, "e2026", ed25519_key)) == [True]


@pytest.mark.parametrize("make_message", MESSAGES.values(), ids=MESSAGES.keys())
def test_rsa_and_ed25519_signatures_together_each_verify(
    make_message: Callable[[], bytes], rsa_key: PrivateKey, ed25519_key: PrivateKey
) -> None:
    signed = sign_message(make_message(), signer(("s2026", rsa_key), ("e2026", ed25519_key)))
    records = (dns_record(DOMAIN, "s2026", rsa_key), dns_record(DOMAIN, "e2026", ed25519_key))

    assert signed.count(b"DKIM-Signature:") == 2
    assert dkimpy_verify(signed, *records) == [True, True]
    verdict = perl_verify(signed, *records)
    assert verdict.overall == "pass", verdict
    assert verdict.by_algorithm("rsa-sha256")["result"] == "pass"
    # Debian 12's Mail::DKIM (1.20230212) predates its ed25519 support: it must pass the
    # message on the rsa signature and call ed25519 unsupported, never a failed signature.
    ed = verdict.by_algorithm("ed25519-sha256")
    assert ed["result"] == "pass" or "unsupported algorithm" in ed["detail"], verdict


@pytest.mark.parametrize("make_message", MESSAGES.values(), ids=MESSAGES.keys())
@pytest.mark.parametrize("kind", ["rsa1024", "rsa2048", "rsa3072", "ed25519"])
def test_fast_path_is_byte_identical_to_stock_dkimpy(
    make_message: Callable[[], bytes], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_private_key("ed25519") if kind == "ed25519" else generate_private_key("rsa", int(kind[3:]))
    message = make_message()

    ours = sign_message(message, signer(("s2026", key)), now=NOW)

    assert ours == stock_dkimpy_signature(message, "s2026", key, monkeypatch) + message


def test_two_keys_give_the_same_signatures_as_signing_with_each_alone(
    rsa_key: PrivateKey, ed25519_key: PrivateKey
) -> None:
    message = plain()
    both = sign_message(message, signer(("s2026", rsa_key), ("e2026", ed25519_key)), now=NOW)
    rsa_alone = sign_message(message, signer(("s2026", rsa_key)), now=NOW)
    ed_alone = sign_message(message, signer(("e2026", ed25519_key)), now=NOW)

    assert both == rsa_alone[: -len(message)] + ed_alone


def test_from_is_signed_once_more_than_it_occurs_and_no_body_length_is_given(rsa_key: PrivateKey) -> None:
    signed = sign_message(plain(), signer(("s2026", rsa_key)), now=NOW)
    tags = dkim.util.parse_tag_value(dkim.rfc822_parse(signed)[0][0][1])

    assert [h.strip() for h in tags[b"h"].split(b":")] == [
        b"from", b"to", b"cc", b"reply-to", b"subject", b"date", b"message-id",
        b"content-type", b"content-transfer-encoding", b"mime-version", b"from",
    ]  # fmt: skip
    assert b"l" not in tags
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"t"] == str(NOW).encode()


def test_a_changed_subject_fails_both_verifiers(rsa_key: PrivateKey) -> None:
    signed = sign_message(plain(), signer(("s2026", rsa_key)))
    tampered = signed.replace(b"Subject: Rechnung RE-2026-0001", b"Subject: Rechnung RE-2026-0002")
    record = dns_record(DOMAIN, "s2026", rsa_key)

    assert dkimpy_verify(tampered, record) == [False]
    assert perl_verify(tampered, record).overall == "fail"


def test_a_second_from_added_in_transit_fails_verification(rsa_key: PrivateKey) -> None:
    signed = sign_message(plain(), signer(("s2026", rsa_key)))
    head, body = signed.split(b"\r\n\r\n", 1)
    tampered = head + b"\r\nFrom: ceo@acme.example\r\n\r\n" + body

    assert dkimpy_verify(tampered, dns_record(DOMAIN, "s2026", rsa_key)) == [False]


def test_a_message_without_from_is_a_permanent_dkim_failure(rsa_key: PrivateKey) -> None:
    message = b"To: kunde@example.com\r\nSubject: x\r\n\r\nbody\r\n"

    with pytest.raises(PermanentError) as raised:
        sign_message(message, signer(("s2026", rsa_key)))
    assert raised.value.reason == "dkim_failed"


def write_key(tmp_path: Path, name: str, key: PrivateKey) -> Path:
    path = tmp_path / name
    path.write_bytes(private_key_pem(key))
    return path


def selector_of(signed: bytes) -> bytes:
    tags = dkim.util.parse_tag_value(dkim.rfc822_parse(signed)[0][0][1])
    selector: bytes = tags[b"s"]
    return selector


def test_load_signer_reads_the_main_key_from_file_and_extra_keys_inline(
    tmp_path: Path, rsa_key: PrivateKey, ed25519_key: PrivateKey
) -> None:
    config = Dkim.model_validate(
        {
            "domain": DOMAIN,
            "selector": "s2026",
            "private_key_file": write_key(tmp_path, "main.pem", rsa_key),
            "extra": [{"selector": "e2026", "private_key": private_key_pem(ed25519_key).decode()}],
        }
    )
    signed = sign_message(plain(), load_signer(config))

    records = (dns_record(DOMAIN, "s2026", rsa_key), dns_record(DOMAIN, "e2026", ed25519_key))
    assert dkimpy_verify(signed, *records) == [True, True]


def test_a_staged_next_key_does_not_sign(tmp_path: Path, rsa_key: PrivateKey) -> None:
    config = Dkim(
        domain=DOMAIN,
        selector="s2026",
        private_key_file=write_key(tmp_path, "old.pem", rsa_key),
        next={"selector": "s2027", "private_key_file": write_key(tmp_path, "new.pem", rsa_key)},
    )

    assert selector_of(sign_message(plain(), load_signer(config), now=4102444800)) == b"s2026"


def test_the_next_key_signs_from_its_active_from_on(tmp_path: Path, rsa_key: PrivateKey) -> None:
    new_key = generate_private_key()
    switch = datetime(2026, 9, 1, tzinfo=UTC)
    config = Dkim(
        domain=DOMAIN,
        selector="s2026",
        private_key_file=write_key(tmp_path, "old.pem", rsa_key),
        next={"selector": "s2027", "private_key_file": write_key(tmp_path, "new.pem", new_key),
              "active_from": switch},
    )  # fmt: skip
    tenant_signer = load_signer(config)

    before = sign_message(plain(), tenant_signer, now=switch.timestamp() - 1)
    after = sign_message(plain(), tenant_signer, now=switch.timestamp())

    assert selector_of(before) == b"s2026"
    assert selector_of(after) == b"s2027"
    assert dkimpy_verify(after, dns_record(DOMAIN, "s2027", new_key)) == [True]


def test_every_dkim_key_needs_its_own_selector() -> None:
    with pytest.raises(ValueError, match="own selector"):
        Dkim(
            domain=DOMAIN,
            selector="s1",
            private_key=SecretStr("k"),
            extra=[{"selector": "s1", "private_key": "x"}],
        )


def test_dknewkey_style_base64_ed25519_seed_is_accepted(ed25519_key: PrivateKey) -> None:
    raw = ed25519_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    key = load_key(DOMAIN, "e2026", base64.b64encode(raw))

    assert key.algorithm == b"ed25519-sha256"
    signed = sign_message(plain(), DkimSigner((key,)))
    assert dkimpy_verify(signed, dns_record(DOMAIN, "e2026", ed25519_key)) == [True]


@pytest.mark.parametrize(
    "data",
    [b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", b""],
    ids=["garbage", "broken_pem", "empty"],
)
def test_an_unreadable_key_is_a_configuration_error(data: bytes) -> None:
    with pytest.raises(ConfigurationError):
        load_private_key(data)


# cryptography refuses to generate keys this small, so here is one from `openssl genrsa 512`.
RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAwkBQB/NNQa8UxaGP
2+KLT8d4Sh1FxbXzgTFxvwp2rbMKAfbCUhfERjwAOfrUBo2p/9ZxlLfWFTBnFpv3
RXvp7wIDAQABAkBb9rys9ugFh9Equ5FzBW71BzeQxwkIUFsHOBRk4JxNIRkvwOqW
2XXt0VATNT6CqTgCAiP5hFGZ8dJS5WWn5vY5AiEA9PVBlhurG9U5x1IDPeRXxIKx
K4oXTp7O1q86EcBlGRUCIQDLAeoqTv7CExp7EukK4EeuCGcXS3wb2jBBLmVZYFFv
8wIhANdLrE6DmPuIiBTgx0qhpGZqO8+5ukx2lfLo5c/uWq0VAiBT1vSYiItaJ32W
OpcYMMwpqbq5uikFb7TiFoEwykCX1QIgPdebOy8s7I86AeLXWMEpJJZ8Osk+7W2y
Fg6fGDsqUU4=
-----END PRIVATE KEY-----
"""


def test_an_rsa_key_below_1024_bits_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="512 bits; at least 1024"):
        load_private_key(RSA_512)


def test_a_missing_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    config = Dkim(domain=DOMAIN, selector="s2026", private_key_file=tmp_path / "absent.pem")

    with pytest.raises(ConfigurationError, match="cannot read DKIM key file"):
        load_signer(config)


def test_the_fast_body_canonicalization_equals_dkimpys_on_random_bodies() -> None:
    import random

    from dkim.canonicalization import Relaxed

    from worker.job.signature import relaxed_body

    pieces = [b" ", b"\t", b"\r\n", b"a", b"\n", b"\r", b"=20", b"  "]
    rng = random.Random(6376)
    for _ in range(20_000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert relaxed_body(body) == Relaxed.canonicalize_body(body), body


def test_the_fast_header_canonicalization_equals_dkimpys_on_random_header_blocks() -> None:
    import random

    from dkim.canonicalization import Relaxed

    from worker.job.signature import relaxed_headers

    names = [b"From", b"To", b"subject", b"X-Y", b"Bad Name", b"", b"a:b"]
    pieces = [b" ", b"\t", b"  ", b"x", b"\xc3\xa4", b"\r\n ", b"\r\n\t", b"\n", b"\r", b"\x0b", b":", b"=?"]
    rng = random.Random(6376)
    for _ in range(20_000):
        lines = [
            rng.choice(names) + b":" + b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
            for _ in range(rng.randint(1, 4))
        ]
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        try:
            expected = Relaxed.canonicalize_headers(dkim.rfc822_parse(head)[0])
        except dkim.MessageFormatError:
            with pytest.raises(PermanentError, match="cannot DKIM-sign"):
                relaxed_headers(head)
            continue
        assert relaxed_headers(head) == expected, head
