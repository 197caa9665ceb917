"""Each PointsClient has a connection of its own, so that clients opened to spread load reach
several server processes (SO_REUSEPORT spreads connections, not calls)."""

from __future__ import annotations

from typing import Any

import grpc

from pointauth.client import PointsClient
from pointauth.v1 import points_service_pb2 as pb


async def test_two_clients_to_one_address_use_two_connections() -> None:
    peers: list[str] = []

    async def get_balance(request: pb.GetBalanceRequest, context: Any) -> pb.GetBalanceResponse:
        peers.append(context.peer())
        return pb.GetBalanceResponse(account_id="a")

    handler = grpc.unary_unary_rpc_method_handler(
        get_balance,
        request_deserializer=pb.GetBalanceRequest.FromString,
        response_serializer=pb.GetBalanceResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("pointauth.v1.PointsService", {"GetBalance": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with (
            PointsClient(f"127.0.0.1:{port}", plaintext=True) as first,
            PointsClient(f"127.0.0.1:{port}", plaintext=True) as second,
        ):
            for client in (first, second, first, second):
                assert (await client.get_balance("4000000000000001")).account_id == "a"
    finally:
        await server.stop(None)
    # A peer is "ipv4:127.0.0.1:<the client's port>": one per connection.
    assert len(peers) == 4
    assert peers[0] == peers[2]
    assert peers[1] == peers[3]
    assert peers[0] != peers[1]
