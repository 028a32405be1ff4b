"""Move a deployment's keys from the untagged layout to the hash-tagged one (keys.py).

Before the hash tags every key was `PREFIX:...`; now most are `{PREFIX}:...`,
`{PREFIX:registry}:...` or `{PREFIX:users}:...` with the same suffixes
(Keys.legacy_renames). The server and the learner run `migrate_layout` at start, on a
single Redis (a Redis Cluster never held the old layout: its scripts failed CROSSSLOT),
and `python -m instructloop.migrate --redis-url URL --redis-prefix P` runs it by hand.

Each key moves with one RENAME inside a Lua script that first checks both names, so
nothing is overwritten and a key's TTL, stream entries and consumer groups move with it;
running it twice, or from two processes at once, moves each key once. When both names
exist the old key is left alone and counted in `conflicts`, with one exception: a new
stream with no entries (a learner that started first created it empty, with its group)
is replaced by the old one, whose groups remember what the learner acknowledged.

Stop every old replica and learner first: one still running writes the old names after
its keys moved, and what it writes then stays there (counted as a conflict next time).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass, field

from instructloop.keys import Keys
from instructloop.redis_client import AsyncClient, connect_async, is_cluster

log = logging.getLogger(__name__)

# KEYS: old, new. Reply: 1 moved, 0 no old key, -1 both exist (left alone).
_RENAME_IF_FREE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('TYPE', KEYS[2]).ok ~= 'stream' or redis.call('XLEN', KEYS[2]) > 0 then
    return -1
  end
end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""
SCAN_COUNT = 1000


@dataclass
class Migration:
    moved: int = 0
    conflicts: list[str] = field(default_factory=list)  # old names left where they are


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def migrate_layout(client: AsyncClient, keys: Keys) -> Migration:
    """Rename every key of the old layout that has no new twin yet; see the module doc."""
    result = Migration()
    if is_cluster(client):
        return result
    rename = client.register_script(_RENAME_IF_FREE)

    async def move(old: str, new: str) -> None:
        moved = await rename(keys=[old, new])
        if moved == 1:
            result.moved += 1
        elif moved == -1:
            result.conflicts.append(old)

    fixed, families = keys.legacy_renames()
    for old, new in fixed:
        await move(old, new)
    for old_prefix, new_prefix in families:
        match = _glob_escape(old_prefix) + "*"
        async for name in client.scan_iter(match=match, count=SCAN_COUNT):
            name = name.decode() if isinstance(name, bytes) else name
            await move(name, new_prefix + name[len(old_prefix) :])
    if result.moved:
        log.info("moved %d Redis keys to the hash-tagged layout", result.moved)
    if result.conflicts:
        log.warning(
            "%d keys of the old layout were not moved because the new name exists too "
            "(an old replica or learner still running?), e.g. %s",
            len(result.conflicts),
            ", ".join(result.conflicts[:5]),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instructloop.migrate",
        description="Move a deployment's Redis keys from the untagged layout (PREFIX:...) "
        "to the hash-tagged one. Stop old replicas and learners first; the server and the "
        "learner also do this at start.",
    )
    parser.add_argument("--redis-url", required=True, help="A single Redis: redis://host:port/0")
    parser.add_argument("--redis-prefix", default="instructloop", help="The key prefix.")
    args = parser.parse_args(argv)

    async def run() -> Migration:
        client = connect_async(args.redis_url, timeout_s=10.0)
        try:
            return await migrate_layout(client, Keys(args.redis_prefix))
        finally:
            await client.aclose()

    result = asyncio.run(run())
    print(f"moved {result.moved} keys; {len(result.conflicts)} left (both names exist)")
    for name in result.conflicts:
        print(f"  not moved: {name}")
    return 1 if result.conflicts else 0


if __name__ == "__main__":
    raise SystemExit(main())
