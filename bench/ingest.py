"""Durable feedback ingest: SubmitFeedback/s through one replica, against the floor of a
raw redis-py pipelined XADD loop on the same Redis with the same fsync setting.

In one run, on the default tiny model (or --model):
  1. one server (a subprocess, --open, no rate limits) on its own embedded Redis (AOF,
     appendfsync always, as in production) logs --prompts prompts (Generate, n=2);
  2. each repeat, --procs load processes with --concurrency calls in flight each send
     --feedback rankings (a fresh user for every (prompt, user) pair, so every one is
     stored, none refused as a second judgement), as fast as the server acknowledges them;
  3. the floor, in the same repeat: the same number of records of the same size, XADDed by
     one redis-py client in pipelines of --floor-batch, to a stream of the same Redis;
  4. the ceiling of the RPC itself, in the same repeat: the same load against a grpc.aio
     server (a subprocess) whose SubmitFeedback answers at once, touching nothing;
  5. lost: every feedback id the server acknowledged is looked for in the feedback stream.

Reported: feedback/s (median over repeats, min-max), ingest / floor and ingest / ceiling
as the ratio of the medians and the median (min-max) of the per-repeat ratios,
SubmitFeedback latency p50/p99 as the clients saw it, lost (acknowledged but not in the
stream; must be 0), and the CPU each acknowledged call cost: in the server process, the
load processes, Redis and the whole machine, with the calls/s the machine's cores would
allow at that cost (a bound that no number of front-end processes can pass).
`--serve-args "--redis-max-batch 1 --prompt-cache-size 0"` runs the server without group
commit and without its prompt cache.

    python bench/ingest.py          # prints a table, writes bench/results/ingest.json
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's server launcher

from benchlib import cpu_seconds, percentile, spread, write_result  # noqa: E402  (bench/ is on sys.path)

PREFIX = "bench-ingest"
PROMPT = "sort: d b a c\n"


# ---------------------------------------------------------------------------- the load


async def _send(target: str, work: list[tuple[str, list[str], str]], concurrency: int):
    """Send every (prompt id, sample ids, user) ranking; returns (acked ids, latencies, errors)."""
    import grpc

    from instructloop.v1 import api_pb2, api_pb2_grpc

    acked, latencies, errors = [], [], []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_pb2_grpc.InstructLoopStub(channel)
        cursor = iter(work)

        async def caller() -> None:
            for prompt_id, samples, user in cursor:
                req = api_pb2.SubmitFeedbackRequest(
                    prompt_id=prompt_id,
                    user_id=user,
                    ranking=api_pb2.Ranking(
                        tiers=[api_pb2.RankTier(sample_ids=[s]) for s in samples]
                    ),
                )
                t = time.perf_counter()
                try:
                    resp = await stub.SubmitFeedback(req, timeout=30)
                except grpc.aio.AioRpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                    continue
                latencies.append(time.perf_counter() - t)
                acked.append(resp.feedback_id)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return acked, latencies, errors


def _load_process(target, work, concurrency, start, results) -> None:
    start.wait()  # every process starts sending at once
    cpu = time.process_time()
    acked, latencies, errors = asyncio.run(_send(target, work, concurrency))
    results.put((acked, latencies, errors, time.process_time() - cpu))


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process (benchlib.cpu_seconds) and of the whole
    machine (busy time summed over its cores: idle, iowait and steal left out)."""
    import psutil

    out = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t = psutil.cpu_times()
    out["machine"] = t.user + t.nice + t.system + t.irq + t.softirq
    return out


def run_load(target: str, work: list, procs: int, concurrency: int, pids: dict[str, int]) -> dict:
    """Send `work` from `procs` processes; the rate, latencies, and the CPU per acknowledged
    call of the load processes, of each process in `pids` and of the whole machine."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    shares = [work[i::procs] for i in range(procs)]
    workers = [
        ctx.Process(target=_load_process, args=(target, s, concurrency, start, results))
        for s in shares
    ]
    for w in workers:
        w.start()
    time.sleep(3.0)  # let the processes import and connect before the clock starts
    cpu0 = cpu_snapshot(pids)
    t0 = time.perf_counter()
    start.set()
    parts = [results.get() for _ in workers]
    seconds = time.perf_counter() - t0
    cpu1 = cpu_snapshot(pids)
    for w in workers:
        w.join()
    acked = [a for p in parts for a in p[0]]
    latencies = [x for p in parts for x in p[1]]
    errors = [x for p in parts for x in p[2]]
    calls = max(len(acked), 1)
    cpu_ms = {name: 1e3 * (cpu1[name] - cpu0[name]) / calls for name in cpu0}
    cpu_ms["load"] = 1e3 * sum(p[3] for p in parts) / calls
    return {
        "seconds": seconds,
        "acked": acked,
        "errors": errors,
        "per_s": len(acked) / seconds,
        "p50_ms": 1e3 * percentile(latencies, 0.5),
        "p99_ms": 1e3 * percentile(latencies, 0.99),
        "cpu_ms_per_call": cpu_ms,
    }


# ---------------------------------------------------------------------------- the ceiling


def _bare_server(port: int, ready) -> None:
    """A gRPC server whose SubmitFeedback answers at once: the RPC's own cost."""
    import grpc

    from instructloop.v1 import api_pb2, api_pb2_grpc

    class Bare(api_pb2_grpc.InstructLoopServicer):
        async def SubmitFeedback(self, request, context):
            return api_pb2.SubmitFeedbackResponse(feedback_id="f")

    async def serve() -> None:
        server = grpc.aio.server()
        api_pb2_grpc.add_InstructLoopServicer_to_server(Bare(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())


class BareServer:
    def __enter__(self) -> BareServer:
        from instructloop.redis_embedded import free_port

        ctx = mp.get_context("spawn")
        port, ready = free_port(), ctx.Event()
        self.proc = ctx.Process(target=_bare_server, args=(port, ready), daemon=True)
        self.proc.start()
        if not ready.wait(60):
            raise RuntimeError("the bare gRPC server did not start")
        self.target = f"127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.join()


# ---------------------------------------------------------------------------- the floor


def run_floor(redis_url: str, record: bytes, count: int, batch: int, stream: str) -> dict:
    """Raw redis-py: `count` XADDs of `record`, `batch` to a pipeline round trip."""
    import redis

    from instructloop.keys import DATA_FIELD

    r = redis.Redis.from_url(redis_url)
    r.delete(stream)
    t0 = time.perf_counter()
    for i in range(0, count, batch):
        pipe = r.pipeline(transaction=False)
        for _ in range(min(batch, count - i)):
            pipe.xadd(stream, {DATA_FIELD: record})
        pipe.execute()
    seconds = time.perf_counter() - t0
    stored = r.xlen(stream)
    r.delete(stream)
    r.close()
    return {"seconds": seconds, "per_s": count / seconds, "stored": stored}


def stored_ids(redis_url: str, stream: str) -> tuple[set[str], int]:
    """Feedback ids in the feedback stream, and the size of the largest record."""
    import redis

    from instructloop.keys import DATA_FIELD
    from instructloop.v1 import records_pb2

    r = redis.Redis.from_url(redis_url)
    ids, largest, last = set(), 0, "-"
    while True:
        rows = r.xrange(stream, min=last, max="+", count=5000)
        rows = [row for row in rows if row[0].decode() != last]
        if not rows:
            break
        for _, fields in rows:
            data = fields[DATA_FIELD]
            rec = records_pb2.FeedbackRecord()
            rec.ParseFromString(data)
            ids.add(rec.feedback_id)
            largest = max(largest, len(data))
        last = rows[-1][0].decode()
    r.close()
    return ids, largest


# ---------------------------------------------------------------------------- the run


def prepare(target: str, count: int) -> list[tuple[str, list[str]]]:
    from instructloop.clients import Client

    with Client(target, timeout=60) as client:
        out = []
        for _ in range(count):
            r = client.generate(PROMPT, n=2, max_tokens=4, temperature=1.0, user_id="bench-app")
            out.append((r.prompt_id, [s.sample_id for s in r.samples]))
    return out


def measure(args, target: str, redis_url: str, pids: dict[str, int]) -> list[dict]:
    from instructloop.keys import Keys

    keys = Keys(PREFIX)
    prompts = prepare(target, args.prompts)
    users_per_prompt = -(-args.feedback // len(prompts))
    runs = []
    for rep in range(args.repeats + 1):  # repeat 0 warms up and is not kept
        work = [
            (pid, samples, f"r{rep}-u{u}")
            for u in range(users_per_prompt)
            for pid, samples in prompts
        ][: args.feedback]
        order = ("ingest", "floor", "ceiling")[:: 1 if rep % 2 == 0 else -1]
        run: dict = {"repeat": rep}
        for what in order:
            if what == "ingest":
                run["ingest"] = run_load(target, work, args.procs, args.concurrency, pids)
            elif what == "ceiling":
                with BareServer() as bare:
                    ceiling = run_load(
                        bare.target, work, args.procs, args.concurrency,
                        {"server": bare.proc.pid},
                    )  # fmt: skip
                ceiling.pop("acked")
                ceiling.pop("errors")
                run["ceiling"] = ceiling
            else:
                _, largest = stored_ids(redis_url, keys.feedback_stream)
                record = os.urandom(max(largest, 64))  # a record of the stored records' size
                run["floor"] = run_floor(
                    redis_url, record, args.feedback, args.floor_batch, f"{PREFIX}:floor"
                )
        ingest = run["ingest"]
        ids, _ = stored_ids(redis_url, keys.feedback_stream)
        acked = set(ingest.pop("acked"))
        ingest["acked"] = len(acked)
        ingest["lost"] = len(acked - ids)
        ingest["errors"] = len(ingest["errors"])
        run["ratio"] = ingest["per_s"] / run["floor"]["per_s"]
        run["ceiling_ratio"] = ingest["per_s"] / run["ceiling"]["per_s"]
        print(
            f"  repeat {rep}{' (warmup)' if rep == 0 else ''}: ingest {ingest['per_s']:,.0f}/s "
            f"(p50 {ingest['p50_ms']:.1f} ms, p99 {ingest['p99_ms']:.1f} ms, errors "
            f"{ingest['errors']}, lost {ingest['lost']}), floor {run['floor']['per_s']:,.0f}/s "
            f"(ratio {run['ratio']:.3f}), ceiling {run['ceiling']['per_s']:,.0f}/s (ratio "
            f"{run['ceiling_ratio']:.2f})",
            flush=True,
        )
        if rep:
            runs.append(run)
    return runs


def summarize(runs: list[dict]) -> dict:
    ingest, floor = spread(runs, "ingest", "per_s"), spread(runs, "floor", "per_s")
    ceiling = spread(runs, "ceiling", "per_s")
    return {
        "ingest_per_s": ingest,
        "floor_per_s": floor,
        "ceiling_per_s": ceiling,
        "ratio_of_medians": ingest["median"] / floor["median"],
        "ratio_per_repeat": spread(runs, "ratio"),
        "ceiling_ratio_of_medians": ingest["median"] / ceiling["median"],
        "ceiling_ratio_per_repeat": spread(runs, "ceiling_ratio"),
        "p50_ms": spread(runs, "ingest", "p50_ms"),
        "p99_ms": spread(runs, "ingest", "p99_ms"),
        "cpu_ms_per_call": {
            path: {
                k: spread(runs, path, "cpu_ms_per_call", k)
                for k in runs[0][path]["cpu_ms_per_call"]
            }
            for path in ("ingest", "ceiling")
        },
        "cores": os.cpu_count(),
        "acked": sum(r["ingest"]["acked"] for r in runs),
        "lost": sum(r["ingest"]["lost"] for r in runs),
        "errors": sum(r["ingest"]["errors"] for r in runs),
    }


def print_table(s: dict, args) -> None:
    def mm(d: dict, fmt: str = ",.0f") -> str:
        return f"{d['median']:{fmt}} ({d['min']:{fmt}}-{d['max']:{fmt}})"

    r, c = s["ratio_per_repeat"], s["ceiling_ratio_per_repeat"]
    print(
        f"\n{args.feedback} rankings per repeat, {args.procs} load processes x "
        f"{args.concurrency} in flight, {args.repeats} repeats; medians (min-max)\n"
    )
    print("| path | records/s | p50 | p99 |")
    print("|---|---|---|---|")
    print(
        f"| SubmitFeedback through one replica (durable) | {mm(s['ingest_per_s'])} | "
        f"{mm(s['p50_ms'], '.1f')} ms | {mm(s['p99_ms'], '.1f')} ms |"
    )
    print(f"| raw redis-py XADD, pipelines of {args.floor_batch} | {mm(s['floor_per_s'])} | | |")
    print(f"| gRPC server doing nothing (ceiling) | {mm(s['ceiling_per_s'])} | | |")
    print(
        f"| ingest / floor | {s['ratio_of_medians']:.3f}; per repeat {r['median']:.3f} "
        f"({r['min']:.3f}-{r['max']:.3f}) | | |"
    )
    print(
        f"| ingest / ceiling | {s['ceiling_ratio_of_medians']:.2f}; per repeat {c['median']:.2f} "
        f"({c['min']:.2f}-{c['max']:.2f}) | | |"
    )
    print(
        "\nCPU ms per acknowledged call, medians (min-max): the server process, the load "
        "processes, Redis, the whole machine (every process, all cores); and the calls/s "
        f"that {s['cores']} cores allow at the machine's CPU per call\n"
    )
    print("| path | server | load | Redis | machine | calls/s the cores allow |")
    print("|---|---|---|---|---|---|")
    for path, name in (("ingest", "durable SubmitFeedback"), ("ceiling", "server doing nothing")):
        cpu = s["cpu_ms_per_call"][path]
        cells = [mm(cpu[k], ".3f") if k in cpu else "-" for k in ("server", "load", "redis")]
        allow = 1e3 * s["cores"] / cpu["machine"]["median"]
        print(f"| {name} | {' | '.join(cells)} | {mm(cpu['machine'], '.3f')} | {allow:,.0f} |")
    print(f"\nacknowledged {s['acked']:,}, lost {s['lost']}, errors {s['errors']}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="HF model dir (default: build the tiny one)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default: 3)")
    parser.add_argument("--feedback", type=int, default=20000, help="rankings per repeat (20000)")
    parser.add_argument("--prompts", type=int, default=100, help="logged prompts judged (100)")
    parser.add_argument("--procs", type=int, default=2, help="load processes (default: 2)")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="calls in flight per load process (64)"
    )
    parser.add_argument(
        "--floor-batch", type=int, default=64, help="XADDs per pipeline in the floor (64)"
    )
    parser.add_argument("--serve-args", default="", help="extra server options, e.g. '--x y'")
    parser.add_argument(
        "--out",
        default=str(ROOT / "bench/results/ingest.json"),
        help="JSON result path (default: bench/results/ingest.json)",
    )
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    import shlex

    from conftest import start_servers, stop_server

    from instructloop.redis_embedded import EmbeddedRedis, free_port
    from instructloop.tinymodel import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    model = Path(args.model) if args.model else build_tiny_model(work / "tiny")
    redis = EmbeddedRedis(work / "redis", port=free_port(), maxmemory="4gb").start()
    print("starting the server ...", flush=True)
    (server,) = start_servers(
        model, redis.url, [work / "server"], PREFIX, *shlex.split(args.serve_args)
    )
    try:
        pids = {"server": server.proc.pid, "redis": redis.proc.pid}
        runs = measure(args, server.target, redis.url, pids)
    finally:
        stop_server(server)
        redis.stop()
    summary = summarize(runs)
    print_table(summary, args)
    write_result(args.out, args, load_before=load_before, runs=runs, summary=summary)
    return 0 if summary["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
