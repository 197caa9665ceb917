"""The access guard's decision for one call, without a server: who the caller is (API key,
client certificate), whether the credential is revoked, and its rate; and the credentials file
it reads (checked as a whole, re-read when it changes, a broken change ignored)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pointauth.server.api.access import AccessGuard, TokenBucket, bearer_key
from pointauth.server.api.credentials import CredentialStore, write_credentials_atomically
from pointauth.server.domain.credentials import (
    Credential,
    CredentialsError,
    Role,
    encode_credentials,
    key_sha256,
    new_api_key,
    parse_credentials,
)
from pointauth.server.domain.reasons import ErrorReason
from pointauth.v1 import points_service_pb2 as pb

TILL_KEY = new_api_key("till-1")
REVOKED_KEY = new_api_key("gone-1")
CREDENTIALS = [
    Credential(id="till-1", role=Role.TILL, company="acme", key_sha256=key_sha256(TILL_KEY)),
    Credential(id="gone-1", role=Role.OPERATOR, key_sha256=key_sha256(REVOKED_KEY), revoked=True),
    Credential(id="kiosk-1", role=Role.KIOSK, certificate="kiosk-1.clients.example"),
    Credential(id="slow-1", role=Role.KIOSK, certificate="slow-1", rate_per_second=2),
]
BALANCE = "/pointauth.v1.PointsService/GetBalance"


class FakeContext:
    """What the guard reads of a call: its metadata and the peer's certificate identities."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), identities: tuple[bytes, ...] = ()) -> None:
        self.metadata, self.identities = metadata, identities

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer_identities(self) -> tuple[bytes, ...] | None:
        return self.identities or None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"


@pytest.fixture
def store(tmp_path: Path) -> CredentialStore:
    path = tmp_path / "credentials.toml"
    write_credentials_atomically(path, encode_credentials(CREDENTIALS))
    loaded = CredentialStore(path, reload_seconds=60)
    loaded.load()
    return loaded


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def _guard(store: CredentialStore, *, mtls: bool, clock: Clock | None = None) -> AccessGuard:
    return AccessGuard(store, mtls=mtls, rate_per_second=1000, burst=1000, monotonic=clock or Clock())


def _outcome(guard: AccessGuard, context: FakeContext, method: str = BALANCE, request: Any = None) -> str:
    refused = guard.check(method, request or pb.GetBalanceRequest(card_number="4000000000000001"), context)  # type: ignore[arg-type]
    if refused is None:
        return "OK"
    return f"{refused.code.name} {ErrorReason.Name(refused.reason)}"


@pytest.mark.parametrize(
    ("mtls", "metadata", "identities", "outcome"),
    [
        (False, (), (), "UNAUTHENTICATED CREDENTIALS_MISSING"),
        (False, (("authorization", f"Bearer {TILL_KEY}"),), (), "OK"),
        (False, (("authorization", f"bearer {TILL_KEY}"),), (), "OK"),
        (False, (("authorization", f"Bearer {TILL_KEY}x"),), (), "UNAUTHENTICATED CREDENTIALS_INVALID"),
        (False, (("authorization", "Bearer till-1"),), (), "UNAUTHENTICATED CREDENTIALS_INVALID"),
        (False, (("authorization", "Bearer nobody.abc"),), (), "UNAUTHENTICATED CREDENTIALS_INVALID"),
        (False, (("authorization", f"Basic {TILL_KEY}"),), (), "UNAUTHENTICATED CREDENTIALS_MISSING"),
        (False, (("authorization", f"Bearer {REVOKED_KEY}"),), (), "UNAUTHENTICATED CREDENTIAL_REVOKED"),
        # Certificate identities count only under mTLS, where the transport verified them.
        (False, (), (b"kiosk-1.clients.example",), "UNAUTHENTICATED CREDENTIALS_MISSING"),
        (True, (), (b"kiosk-1.clients.example",), "OK"),
        (True, (), (b"other.example", b"kiosk-1.clients.example"), "OK"),
        (True, (), (b"stranger",), "UNAUTHENTICATED CREDENTIALS_INVALID"),
        # A key, when given, decides, whatever the certificate says.
        (
            True,
            (("authorization", "Bearer nobody.abc"),),
            (b"kiosk-1.clients.example",),
            "UNAUTHENTICATED CREDENTIALS_INVALID",
        ),
        (True, (("authorization", f"Bearer {TILL_KEY}"),), (b"stranger",), "OK"),
    ],
)
def test_who_is_calling(
    store: CredentialStore,
    mtls: bool,
    metadata: tuple[tuple[str, str], ...],
    identities: tuple[bytes, ...],
    outcome: str,
) -> None:
    assert _outcome(_guard(store, mtls=mtls), FakeContext(metadata, identities)) == outcome


def test_a_key_issued_since_the_last_poll_is_known_at_its_first_call(store: CredentialStore) -> None:
    new_key = new_api_key("kiosk-9")
    added = [*CREDENTIALS, Credential(id="kiosk-9", role=Role.KIOSK, key_sha256=key_sha256(new_key))]
    write_credentials_atomically(store.path, encode_credentials(added))
    assert _outcome(_guard(store, mtls=False), FakeContext((("authorization", f"Bearer {new_key}"),))) == "OK"


def test_an_authenticated_caller_is_then_checked_for_the_method(store: CredentialStore) -> None:
    kiosk = FakeContext(identities=(b"kiosk-1.clients.example",))
    guard = _guard(store, mtls=True)
    redeem = pb.RedeemPointsRequest(card_number="4000000000000001")
    assert (
        _outcome(guard, kiosk, "/pointauth.v1.PointsService/RedeemPoints", redeem)
        == "PERMISSION_DENIED METHOD_NOT_ALLOWED"
    )


def test_each_credential_has_its_own_rate(store: CredentialStore) -> None:
    clock = Clock()
    guard = AccessGuard(store, mtls=True, rate_per_second=1000, burst=3, monotonic=clock)
    slow, kiosk = FakeContext(identities=(b"slow-1",)), FakeContext(identities=(b"kiosk-1.clients.example",))
    assert [_outcome(guard, slow) for _ in range(4)] == ["OK"] * 3 + ["RESOURCE_EXHAUSTED RATE_LIMITED"]
    assert _outcome(guard, kiosk) == "OK"  # another credential's bucket is full
    refused = guard.check(BALANCE, pb.GetBalanceRequest(), slow)  # type: ignore[arg-type]
    assert refused is not None
    assert refused.retry_delay_ms == 500  # 2 a second: the next token in 0.5 s
    clock.now += 0.5
    assert _outcome(guard, slow) == "OK"


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]
    assert bucket.take(10.0) == 0.0
    assert bucket.take(10.0) == 0.0
    assert bucket.take(10.0) > 0  # idle for 10 s still gives only `burst`


def test_bearer_key_reads_the_authorization_entry_only() -> None:
    assert bearer_key((("x-other", "Bearer a.b"), ("authorization", "Bearer a.b "))) == "a.b"
    assert bearer_key((("authorization", b"Bearer a.b"),)) is None
    assert bearer_key(None) is None


def test_a_changed_file_is_read_again_and_a_broken_one_ignored(store: CredentialStore) -> None:
    assert store.reload_if_changed() is False
    revoked = [Credential(id="till-1", role=Role.TILL, company="acme", key_sha256=key_sha256(TILL_KEY), revoked=True)]
    write_credentials_atomically(store.path, encode_credentials(revoked))
    assert store.reload_if_changed() is True
    assert store.by_id["till-1"].revoked
    assert set(store.by_id) == {"till-1"}
    store.path.write_text("[[credential]]\nid = 'x'\n")  # no role: the whole file is refused
    os.utime(store.path, ns=(1, 1))
    assert store.reload_if_changed() is False
    assert store.by_id["till-1"].revoked  # the previous credentials stay in force


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("id = 'a'\nrole = 'kiosk'\n", "needs key_sha256 or certificate"),
        ("id = 'a'\nrole = 'till'\ncertificate = 'a'\n", "a till needs its company"),
        ("id = 'a'\nrole = 'partner'\ncertificate = 'a'\n", "a partner needs a scope"),
        ("id = 'a'\nrole = 'kiosk'\ncertificate = 'a'\nscope = ['PointsService/GetBalance']\n", "only a partner"),
        ("id = 'a'\nrole = 'kiosk'\nkey_sha256 = 'abc'\n", "64 lowercase hex"),
        ("id = 'a b'\nrole = 'kiosk'\ncertificate = 'a'\n", "id must be"),
        ("id = 'a'\nrole = 'root'\ncertificate = 'a'\n", "$.credential[0].role"),
        ("id = 'a'\nrole = 'kiosk'\ncertificate = 'a'\nadmin = true\n", "unknown field `admin`"),
    ],
)
def test_a_bad_entry_refuses_the_file_naming_it(entries: str, message: str) -> None:
    with pytest.raises(CredentialsError) as error:
        parse_credentials(f"[[credential]]\n{entries}")
    assert message in str(error.value)


def test_ids_keys_and_certificates_are_each_one_credential_s() -> None:
    one = "[[credential]]\nid = 'a'\nrole = 'kiosk'\ncertificate = 'c'\n"
    with pytest.raises(CredentialsError, match="used by another"):
        parse_credentials(one + one)
    with pytest.raises(CredentialsError, match="names another credential"):
        parse_credentials(one + one.replace("'a'", "'b'"))


def test_the_file_round_trips_and_never_holds_a_key() -> None:
    text = encode_credentials(CREDENTIALS)
    assert parse_credentials(text) == CREDENTIALS
    assert TILL_KEY not in text
    assert key_sha256(TILL_KEY) in text
