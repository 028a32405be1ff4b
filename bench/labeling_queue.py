"""Labeling-queue benchmark: comparisons per second through the queue (NextTask, then
SubmitFeedback) against direct SubmitFeedback on prompts the labeler generated itself.

One run, one server (a subprocess: authenticated, --queue-share 1, --queue-overlap 1, no
rate limits) on its own embedded Redis (AOF, appendfsync always, as in production), on
the tiny model (or --model). Each repeat:

  1. prepares, untimed: each direct labeler generates its share of --comparisons prompts
     (n=4); the queue is emptied; an app generates --comparisons prompts, which all
     enter the queue;
  2. times both paths, --concurrency labelers each, in an order that alternates between
     repeats: "direct", every labeler ranks its own prompts (SubmitFeedback); "queue",
     every labeler loops NextTask -> SubmitFeedback (ranking) until --comparisons are
     done.

Comparisons/s is comparisons divided by the wall time of the phase. Reported: the
medians over the repeats, and queue/direct as the ratio of medians and as the median
(min-max) of the per-repeat ratios; per-call latency p50 of NextTask and SubmitFeedback.

    python bench/labeling_queue.py   # a table; writes bench/results/labeling_queue.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's server launcher

from benchlib import write_result  # noqa: E402  (bench/ is on sys.path as a script)

from instructloop.keys import Keys  # noqa: E402

PREFIX = "bench-queue"
TOKEN = "bench-admin-token"
PROMPT = "sort: d b a c\n"
SAMPLING = {"n": 4, "max_tokens": 4, "temperature": 1.0}


def _ranking(samples) -> list[str]:
    return [s.sample_id for s in reversed(samples)]


async def _direct(clients, prompts: dict[str, list], timings: dict) -> None:
    """Every labeler ranks its own prompts, one after another."""

    async def labeler(user: str) -> None:
        for r in prompts[user]:
            t = time.perf_counter()
            await clients[user].rank(r.prompt_id, _ranking(r.samples))
            timings["feedback"].append(time.perf_counter() - t)

    await asyncio.gather(*(labeler(u) for u in prompts))


async def _queue(clients, users: list[str], comparisons: int, timings: dict) -> None:
    """Every labeler takes tasks and ranks them until `comparisons` are made."""
    left = [comparisons]

    async def labeler(user: str) -> None:
        while left[0] > 0:
            left[0] -= 1
            t = time.perf_counter()
            task = await clients[user].next_task()
            t2 = time.perf_counter()
            await clients[user].rank(task.prompt_id, _ranking(task.samples))
            timings["next_task"].append(t2 - t)
            timings["feedback"].append(time.perf_counter() - t2)

    await asyncio.gather(*(labeler(u) for u in users))


async def _prepare(clients, redis, direct: list[str], app: str, n: int) -> dict[str, list]:
    """Direct labelers' own prompts (n split among them), then an emptied queue holding
    n prompts of the app."""
    per = [n // len(direct) + (i < n % len(direct)) for i in range(len(direct))]

    async def generate(user: str, count: int) -> list:
        return [await clients[user].generate(PROMPT, **SAMPLING) for _ in range(count)]

    own = await asyncio.gather(*(generate(u, k) for u, k in zip(direct, per, strict=True)))
    stale = [k async for k in redis.scan_iter(f"{Keys(PREFIX).data_tag}:queue:*")]
    if stale:
        await redis.delete(*stale)
    await asyncio.gather(*(generate(app, n // 4 + (i < n % 4)) for i in range(4)))
    return dict(zip(direct, own, strict=True))


def _p50_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values) if values else float("nan")


async def measure(args, target: str, tokens: dict[str, str], redis_url: str) -> list[dict]:
    import redis.asyncio as aioredis

    from instructloop.clients import AsyncClient

    redis = aioredis.Redis.from_url(redis_url)
    clients = {u: AsyncClient(target, token=t, timeout=60) for u, t in tokens.items()}
    direct = [u for u in tokens if u.startswith("direct-")]
    queued = [u for u in tokens if u.startswith("queue-")]
    runs = []
    try:
        for rep in range(args.repeats + 1):  # repeat 0 warms up and is not kept
            prompts = await _prepare(clients, redis, direct, "app", args.comparisons)
            run: dict = {"repeat": rep}
            for path in ("direct", "queue") if rep % 2 == 0 else ("queue", "direct"):
                timings: dict[str, list[float]] = {"next_task": [], "feedback": []}
                t0 = time.perf_counter()
                if path == "direct":
                    await _direct(clients, prompts, timings)
                else:
                    await _queue(clients, queued, args.comparisons, timings)
                seconds = time.perf_counter() - t0
                run[path] = {
                    "seconds": seconds,
                    "comparisons_per_s": args.comparisons / seconds,
                    "next_task_p50_ms": _p50_ms(timings["next_task"]),
                    "feedback_p50_ms": _p50_ms(timings["feedback"]),
                }
            run["ratio"] = run["queue"]["comparisons_per_s"] / run["direct"]["comparisons_per_s"]
            print(
                f"  repeat {rep}{' (warmup)' if rep == 0 else ''}: direct "
                f"{run['direct']['comparisons_per_s']:.0f}/s, queue "
                f"{run['queue']['comparisons_per_s']:.0f}/s, ratio {run['ratio']:.2f}",
                flush=True,
            )
            if rep:
                runs.append(run)
    finally:
        for c in clients.values():
            await c.close()
        await redis.aclose()
    return runs


def summarize(runs: list[dict]) -> dict:
    def med(path: str, key: str) -> float:
        return statistics.median(r[path][key] for r in runs)

    summary = {
        path: {
            "comparisons_per_s": med(path, "comparisons_per_s"),
            "min": min(r[path]["comparisons_per_s"] for r in runs),
            "max": max(r[path]["comparisons_per_s"] for r in runs),
            "feedback_p50_ms": med(path, "feedback_p50_ms"),
        }
        for path in ("direct", "queue")
    }
    summary["queue"]["next_task_p50_ms"] = med("queue", "next_task_p50_ms")
    ratios = [r["ratio"] for r in runs]
    summary["ratio_of_medians"] = (
        summary["queue"]["comparisons_per_s"] / summary["direct"]["comparisons_per_s"]
    )
    summary["ratio_per_repeat"] = {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }
    return summary


def print_table(summary: dict, args) -> None:
    d, q, r = summary["direct"], summary["queue"], summary["ratio_per_repeat"]
    print(
        f"\n{args.comparisons} comparisons per path and repeat, concurrency {args.concurrency}, "
        f"{args.repeats} repeats, medians (min-max)\n"
    )
    print("| path | comparisons/s | NextTask p50 | SubmitFeedback p50 |")
    print("|---|---|---|---|")
    print(
        f"| direct SubmitFeedback (own prompts) | {d['comparisons_per_s']:,.0f} "
        f"({d['min']:,.0f}-{d['max']:,.0f}) | - | {d['feedback_p50_ms']:.1f} ms |"
    )
    print(
        f"| queue: NextTask + SubmitFeedback | {q['comparisons_per_s']:,.0f} "
        f"({q['min']:,.0f}-{q['max']:,.0f}) | {q['next_task_p50_ms']:.1f} ms | "
        f"{q['feedback_p50_ms']:.1f} ms |"
    )
    print(
        f"| queue / direct | {summary['ratio_of_medians']:.2f}; per repeat "
        f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) | | |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="HF model dir (default: build the tiny one)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default: 5)")
    parser.add_argument(
        "--comparisons", type=int, default=200, help="comparisons per path and repeat (200)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="labelers acting at once, per path (4)"
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "bench/results/labeling_queue.json"),
        help="JSON result path (default: bench/results/labeling_queue.json)",
    )
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    from conftest import start_servers, stop_server

    from instructloop.clients.admin import AdminClient
    from instructloop.redis_embedded import EmbeddedRedis, free_port
    from instructloop.tinymodel import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    model = Path(args.model) if args.model else build_tiny_model(work / "tiny")
    redis = EmbeddedRedis(work / "redis", port=free_port()).start()
    extra = ("--no-open", "--admin-token", TOKEN, "--queue-share", "1", "--queue-overlap", "1",
             "--rate-limit-tasks", "")  # fmt: skip
    print("starting the server ...", flush=True)
    (server,) = start_servers(model, redis.url, [work / "server"], PREFIX, *extra)
    try:
        users = {"app": "app"}
        for i in range(args.concurrency):
            users[f"direct-{i}"] = users[f"queue-{i}"] = "labeler"
        with AdminClient(server.target, token=TOKEN, actor="bench") as admin:
            tokens = {u: admin.add_user(u, role).token for u, role in users.items()}
        runs = asyncio.run(measure(args, server.target, tokens, redis.url))
    finally:
        stop_server(server)
        redis.stop()
    summary = summarize(runs)
    print_table(summary, args)
    write_result(args.out, args, load_before=load_before, runs=runs, summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
