"""Client credentials: who a caller is (an API key's SHA-256, or a client certificate's
identity), its role, the company it acts for and, for a partner, the RPCs it may call.

The credentials file is TOML, one `[[credential]]` table per credential:

    [[credential]]
    id = "till-acme-0001"            # the grammar of every id (domain/ids.py)
    role = "till"                    # till, kiosk, partner, operator, auditor
    company = "acme"                 # its points of sale must be this company's (a till needs one)
    key_sha256 = "9f86d0..."         # hex SHA-256 of the API key; the key itself is never stored
    certificate = "till-acme-0001"   # or/and: an identity of its mTLS client certificate (SAN or CN)
    scope = ["PointsService/GetBalance"]   # partner: the RPCs it may call
    rate_per_second = 50             # optional: its own rate instead of auth.rate_per_second
    revoked = false

An API key is `<credential id>.<secret>`: the id finds the credential, the whole key's SHA-256
is compared with `key_sha256` in constant time.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import tomllib

import msgspec

from pointauth.server.domain.ids import ID_RULE, is_id

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class Role(enum.StrEnum):
    TILL = "till"
    """A point of sale: earns, holds, redemptions, refunds, balances and receipts, check-ins and
    coupons, at its own company's stores."""
    KIOSK = "kiosk"
    """A store kiosk or the member app: balances, receipts, check-ins and card self-service."""
    PARTNER = "partner"
    """A partner system: exactly the RPCs its scope lists."""
    OPERATOR = "operator"
    """Head office: accounts, cards, merges, grants, the group directory, rules, settlement, and
    every read."""
    AUDITOR = "auditor"
    """Reads only (Get*, List*, Export*)."""


class Credential(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    id: str
    role: Role
    company: str = ""
    key_sha256: str = ""
    certificate: str = ""
    scope: tuple[str, ...] = ()
    rate_per_second: int = 0
    """0: the server's `auth.rate_per_second`."""
    revoked: bool = False


class CredentialsFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    credential: list[Credential] = msgspec.field(default_factory=list)


class CredentialsError(ValueError):
    """A credentials file that cannot be used; the message names the entry and the field."""


def key_sha256(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key(credential_id: str) -> str:
    """A fresh key for the credential: its id (so the server finds the entry) and 256 random bits."""
    return f"{credential_id}.{secrets.token_urlsafe(32)}"


def credential_id_of_key(api_key: str) -> str:
    """The id part of a key ("" if it has none); the secret's alphabet has no '.'."""
    credential_id, dot, _secret = api_key.rpartition(".")
    return credential_id if dot else ""


def parse_credentials(text: str) -> list[Credential]:
    """The file's credentials, checked as a whole: a mistake anywhere refuses the whole file, so
    that a half-understood file never grants (or fails to revoke) anything."""
    try:
        parsed = msgspec.convert(tomllib.loads(text), CredentialsFile)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise CredentialsError(f"credentials file: {exc}") from exc
    seen_ids: set[str] = set()
    seen_keys: set[str] = set()
    seen_certificates: set[str] = set()
    for index, entry in enumerate(parsed.credential):
        where = f"credential[{index}] ({entry.id!r})"
        if not is_id(entry.id):
            raise CredentialsError(f"{where}: id must be {ID_RULE}")
        if entry.id in seen_ids:
            raise CredentialsError(f"{where}: the id is used by another credential")
        if not entry.key_sha256 and not entry.certificate:
            raise CredentialsError(f"{where}: needs key_sha256 or certificate")
        if entry.key_sha256:
            if not _SHA256_HEX.fullmatch(entry.key_sha256):
                raise CredentialsError(f"{where}: key_sha256 must be 64 lowercase hex digits")
            if entry.key_sha256 in seen_keys:
                raise CredentialsError(f"{where}: key_sha256 is another credential's")
        if entry.certificate in seen_certificates:
            raise CredentialsError(f"{where}: certificate {entry.certificate!r} names another credential too")
        if entry.company and not is_id(entry.company):
            raise CredentialsError(f"{where}: company must be {ID_RULE}")
        if entry.role is Role.TILL and not entry.company:
            raise CredentialsError(f"{where}: a till needs its company")
        if (entry.role is Role.PARTNER) != bool(entry.scope):
            raise CredentialsError(f"{where}: a partner needs a scope, and only a partner has one")
        if entry.rate_per_second < 0:
            raise CredentialsError(f"{where}: rate_per_second must be 0 (the default) or more")
        seen_ids.add(entry.id)
        if entry.key_sha256:
            seen_keys.add(entry.key_sha256)
        if entry.certificate:
            seen_certificates.add(entry.certificate)
    return parsed.credential


def encode_credentials(credentials: list[Credential]) -> str:
    header = (
        "# pointauth credentials: `pointauth credentials issue|revoke` edit this file; servers\n"
        "# re-read it when it changes. Keys are stored as SHA-256 only.\n\n"
    )
    return header + msgspec.toml.encode(CredentialsFile(credential=credentials)).decode()
