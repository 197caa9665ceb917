"""A member's balance with the Python SDK:
`python get_balance.py --ca ca.crt --cert till.crt --key till.key 127.0.0.1:50051 9100000000000001`.

Without --ca/--cert/--key (or --plaintext) the SDK reads POINTAUTH_CA_FILE, POINTAUTH_CERT_FILE,
POINTAUTH_KEY_FILE, POINTAUTH_API_KEY_FILE and POINTAUTH_PLAINTEXT; an API key is best given
that way (or as a file), never on the command line where `ps` shows it.
"""

from __future__ import annotations

import argparse
import asyncio

from pointauth.client import ClientTLS, PointsClient


async def main(args: argparse.Namespace) -> None:
    tls = ClientTLS.from_files(args.ca, args.cert, args.key) if args.ca or args.cert else None
    async with PointsClient(args.address, tls=tls, plaintext=args.plaintext) as client:
        reply = await client.get_balance(args.card_number)
    print(f"{reply.account_id}: {reply.balance.available_points} points available, {reply.balance.held_points} held")
    for lot in reply.lots:
        print(f"  {lot.points} points expiring {lot.expire_time.ToDatetime():%Y-%m-%d}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a member's balance")
    parser.add_argument("--ca", help="the CA that signed the server's certificate (PEM)")
    parser.add_argument("--cert", help="this client's certificate (PEM), for mTLS")
    parser.add_argument("--key", help="this client's private key (PEM), for mTLS")
    parser.add_argument("--plaintext", action="store_true", help="a server without TLS")
    parser.add_argument("address")
    parser.add_argument("card_number")
    asyncio.run(main(parser.parse_args()))
