"""The SDK's public surface is what we mean to support, and the stack is configured as promised."""

from __future__ import annotations

import tomllib
from pathlib import Path

from redis.asyncio import Redis

import pointauth.client
from pointauth.server.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_client_exports_exactly_its_public_names() -> None:
    public = {name for name in dir(pointauth.client) if not name.startswith("_")}
    assert set(pointauth.client.__all__) == public
    assert set(pointauth.client.__all__) == {
        "Channel",
        "ClientTLS",
        "ConflictError",
        "ErrorReason",
        "InternalError",
        "InvalidArgumentError",
        "LotKind",
        "NotFoundError",
        "OverloadedError",
        "PermissionDeniedError",
        "PointOfSale",
        "PointauthError",
        "PointsClient",
        "RefusedError",
        "RetryableError",
        "UnauthenticatedError",
        "UnavailableError",
        "error_from_rpc",
        "new_request_id",
    }
    assert issubclass(pointauth.client.RefusedError, pointauth.client.PointauthError)
    assert issubclass(pointauth.client.OverloadedError, pointauth.client.RetryableError)
    assert issubclass(pointauth.client.UnavailableError, pointauth.client.RetryableError)


async def test_redis_is_durable_and_never_evicts(redis: Redis) -> None:
    config = await redis.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "always"
    assert config["maxmemory-policy"] == "noeviction"


def test_deploy_settings_file_is_valid_and_matches_defaults() -> None:
    path = ROOT / "deploy" / "pointauth.toml"
    tomllib.loads(path.read_text())
    assert load_settings(path, env={}) == load_settings(None, env={})
