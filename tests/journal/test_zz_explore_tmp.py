from redis.asyncio import Redis

from pointauth.client import PointsClient
from pointauth.server.app import PointauthServer
from pointauth.server.clock import ManualClock
from pointauth.server.config import Settings
from pointauth.server.ledger import Keyspace
from tests.helpers import events
from tests.journal.ranks_story import MEMBERS, ranks_story


async def test_explore(client: PointsClient, server: PointauthServer, clock: ManualClock, redis: Redis, keyspace: Keyspace, settings: Settings) -> None:
    await ranks_story(client, clock, redis, settings)
    for m in MEMBERS:
        for e in await events(redis, keyspace, m):
            e.pop("account"); e.pop("time")
            print(m, e)
