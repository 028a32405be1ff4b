"""Swap benchmark: what a version swap costs the clients of a live server.

In one run, on the default tiny model (or --model):
  1. our server (a subprocess, LoRA enabled, real Redis) under steady greedy load from
     --concurrency clients; for each mode (full weights, LoRA adapter) and --repeats
     swaps: the time from the promote call (the registry event) to the first response
     that names the new version, requests failed, and request latency p50/p99 in the
     second after each promote against steady state;
  2. the swap path split into its parts, from the server's own
     instructloop_swap_phase_seconds (read before and after each swap): event (promote ->
     registry event received), verify (signature, checksums), drain (full: in-flight
     requests finish), load (full: pause + reload_weights + resume; LoRA: add_lora);
     "after" is what remains of promote -> first new response: the first request's time;
  3. the bare vLLM calls the server's swap is built on, in-process on the same model:
     pause + reload_weights + resume (full), and add_lora (LoRA);
and reports the swap path (event + verify + load: the drain is the time in-flight requests
take to finish, request time) and promote -> first new response against the bare call, as
ratios.

    python bench/swap.py                 # prints a table, writes bench/results/swap.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's server launcher

from benchlib import percentile  # noqa: E402  (bench/ is on sys.path as a script)

PROMPT = "reverse: swap"
GREEDY = {"n": 1, "max_tokens": 12, "temperature": 0.0}
TOKEN = "bench-admin-token"
PREFIX = "bench-swap"


class Load:
    """Closed-loop greedy clients; records (start, end, version, error) per request."""

    def __init__(self, target: str, concurrency: int):
        from instructloop.clients import Client

        self.clients = [Client(target, timeout=60, max_attempts=1) for _ in range(concurrency)]
        self.records: list[tuple[float, float, str, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c,)) for c in self.clients]

    def _run(self, client) -> None:
        import grpc

        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                version, error = client.generate(PROMPT, **GREEDY).version, ""
            except grpc.RpcError as e:
                version, error = "", e.code().name
            self.records.append((start, time.perf_counter(), version, error))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        for c in self.clients:
            c.close()

    def first_response_of(self, version: str, after: float, timeout: float = 60) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            ends = [end for start, end, v, _ in list(self.records) if v == version and end > after]
            if ends:
                return min(ends) - after
            time.sleep(0.001)
        raise TimeoutError(f"no response from {version} within {timeout}s")

    def window(self, t0: float, t1: float) -> tuple[list[float], int]:
        rows = [r for r in list(self.records) if t0 <= r[0] < t1]
        return [end - start for start, end, _, e in rows if not e], sum(1 for r in rows if r[3])


PHASES = ("event", "verify", "drain", "load")


def phase_sums(metrics_url: str) -> dict[str, float]:
    """instructloop_swap_phase_seconds_sum of each phase, from the server's /metrics."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    sums = dict.fromkeys(PHASES, 0.0)
    for line in text.splitlines():
        if line.startswith("instructloop_swap_phase_seconds_sum{"):
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            sums[phase] = float(line.rsplit(" ", 1)[1])
    return sums


def publish(redis_url: str, store_dir: Path, src: Path, kind: str, base: str) -> str:
    """Publish as the learner does, signed with the server's registry key (its data dir's)."""
    import redis.asyncio as aioredis

    from instructloop.keys import Keys
    from instructloop.registry import Registry, load_registry_key, publish_version
    from instructloop.store import ModelStore

    key = load_registry_key(store_dir.parent / "server" / "registry-key")

    async def go() -> str:
        client = aioredis.Redis.from_url(redis_url)
        try:
            info = await publish_version(
                Registry(client, Keys(PREFIX), key), ModelStore(store_dir), str(src), kind=kind,
                parent="v0", base_model=base, gate={"passed": True, "reason": "bench"},
                actor="bench",
            )  # fmt: skip
            return info.id
        finally:
            await client.aclose()

    return asyncio.run(go())


def measure_server(args, model: Path, work: Path, variants: dict) -> dict:
    from conftest import start_servers, stop_server

    from instructloop.clients.admin import AdminClient
    from instructloop.redis_embedded import EmbeddedRedis, free_port

    redis = EmbeddedRedis(work / "redis", port=free_port()).start()
    store_dir = work / "store"
    # One server, no balancer: the swap itself, without the grace a balancer needs.
    extra = ("--enable-lora", "--model-store", str(store_dir), "--admin-token", TOKEN,
             "--poll-interval-s", "5", "--swap-drain-grace-s", "0")  # fmt: skip
    (server,) = start_servers(model, redis.url, [work / "server"], PREFIX, *extra)
    result: dict = {"swaps": []}
    try:
        ids = {
            "full": [
                publish(redis.url, store_dir, p, "full", str(model)) for p in variants["full"]
            ],
            "lora": [publish(redis.url, store_dir, p, "lora", "v0") for p in variants["lora"]],
        }
        admin = AdminClient(server.target, token=TOKEN, actor="bench")
        with Load(server.target, args.concurrency) as load:
            time.sleep(args.steady_s)
            steady_end = time.perf_counter()
            steady, steady_failed = load.window(0, steady_end)
            result["steady"] = {
                "requests": len(steady), "failed": steady_failed,
                "p50_ms": 1e3 * percentile(steady, 0.5), "p99_ms": 1e3 * percentile(steady, 0.99),
            }  # fmt: skip
            for mode in ("full", "lora"):
                admin.promote("v0")  # every swap starts from v0's weights
                time.sleep(1.0)
                for i in range(args.repeats):
                    target = ids[mode][i % len(ids[mode])]
                    before = phase_sums(server.metrics_url)
                    t0 = time.perf_counter()
                    admin.promote(target, reason="bench")
                    latency = load.first_response_of(target, t0)
                    time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))
                    lat, failed = load.window(t0, t0 + 1.0)
                    after = phase_sums(server.metrics_url)
                    phases = {p: after[p] - before[p] for p in PHASES}
                    path = sum(v for p, v in phases.items() if p != "drain")
                    result["swaps"].append({"mode": mode, "version": target, "swap_s": latency,
                                            "phases_s": phases, "path_s": path,
                                            "failed": failed, "p50_ms": 1e3 * percentile(lat, 0.5),
                                            "p99_ms": 1e3 * percentile(lat, 0.99)})  # fmt: skip
                    print(f"  {mode:4} -> {target}: first response {1e3 * latency:.0f} ms, "
                          f"swap path {1e3 * path:.0f} ms without the drain ("
                          + ", ".join(f"{p} {1e3 * v:.1f}" for p, v in phases.items())
                          + f"), {failed} failed", flush=True)  # fmt: skip
                    if mode == "full":
                        admin.promote("v0")
                        time.sleep(0.5)
            result["total_requests"] = len(load.records)
            result["total_failed"] = sum(1 for r in load.records if r[3])
        admin.close()
    finally:
        stop_server(server)
        redis.stop()
    return result


async def measure_bare(args, model: Path, variants: dict) -> dict:
    """The vLLM calls underneath: pause + reload_weights + resume, and add_lora."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model), dtype="float32", enforce_eager=True, enable_lora=True,
        max_lora_rank=16, max_loras=4, disable_log_stats=True,
    ))  # fmt: skip
    full, lora = [], []
    try:
        for i in range(args.repeats):
            target = variants["full"][i % len(variants["full"])]
            t0 = time.perf_counter()
            await llm.pause_generation(mode="wait")
            await llm.collective_rpc("reload_weights", kwargs={"weights_path": str(target)})
            await llm.resume_generation()
            full.append(time.perf_counter() - t0)
        for i in range(args.repeats):
            request = LoRARequest(f"bench-{i}", i + 1, str(variants["lora"][i % 2]))
            t0 = time.perf_counter()
            await llm.add_lora(request)
            lora.append(time.perf_counter() - t0)
    finally:
        llm.shutdown()
    return {"full": full, "lora": lora}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="HF model dir (default: build the tiny one)")
    parser.add_argument("--repeats", type=int, default=5, help="swaps per mode (default: 5)")
    parser.add_argument("--concurrency", type=int, default=8, help="load clients (default: 8)")
    parser.add_argument(
        "--steady-s",
        type=float,
        default=5.0,
        help="seconds of steady load measured before the swaps (default: 5)",
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "bench/results/swap.json"),
        help="JSON result path (default: bench/results/swap.json)",
    )
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from instructloop.tinymodel import build_tiny_model
    from instructloop.variants import full_variant, lora_variant

    work = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    model = Path(args.model) if args.model else build_tiny_model(work / "tiny")
    variants = {
        "full": [full_variant(model, work / f"full{i}", seed=i) for i in (1, 2)],
        "lora": [lora_variant(model, work / f"lora{i}", seed=10 + i) for i in (1, 2)],
    }
    print("server under load ...", flush=True)
    served = measure_server(args, model, work, variants)
    print("bare vLLM calls ...", flush=True)
    bare = asyncio.run(measure_bare(args, model, variants))

    table = Table(title=f"swap latency (concurrency {args.concurrency}, {args.repeats} swaps/mode)")
    for col in ("mode", *PHASES, "swap path (no drain)", "bare vLLM call", "path / bare", "after",
                "promote -> first new response", "first / bare", "failed",
                "p99 during swap", "p99 steady"):  # fmt: skip
        table.add_column(col, justify="right")
    summary = {}
    for mode in ("full", "lora"):
        rows = [s for s in served["swaps"] if s["mode"] == mode]
        swap_p50 = statistics.median(s["swap_s"] for s in rows)
        path_p50 = statistics.median(s["path_s"] for s in rows)
        phases = {p: statistics.median(s["phases_s"][p] for s in rows) for p in PHASES}
        after_p50 = statistics.median(s["swap_s"] - s["path_s"] for s in rows)
        bare_p50 = statistics.median(bare[mode])
        p99_swap = statistics.median(s["p99_ms"] for s in rows)
        summary[mode] = {"swap_p50_s": swap_p50, "bare_p50_s": bare_p50,
                         "ratio": swap_p50 / bare_p50, "path_p50_s": path_p50,
                         "path_ratio": path_p50 / bare_p50, "phases_p50_s": phases,
                         "after_p50_s": after_p50, "failed": sum(s["failed"] for s in rows),
                         "p99_during_swap_ms": p99_swap}  # fmt: skip
        table.add_row(mode, *(f"{1e3 * phases[p]:.1f} ms" for p in PHASES),
                      f"{1e3 * path_p50:.0f} ms", f"{1e3 * bare_p50:.0f} ms",
                      f"{path_p50 / bare_p50:.2f}x", f"{1e3 * after_p50:.0f} ms",
                      f"{1e3 * swap_p50:.0f} ms", f"{swap_p50 / bare_p50:.1f}x",
                      str(summary[mode]["failed"]), f"{p99_swap:.0f} ms",
                      f"{served['steady']['p99_ms']:.0f} ms")  # fmt: skip
    Console(width=240).print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "params": vars(args),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "server": served, "bare": bare, "summary": summary,
    }, indent=2))  # fmt: skip
    print(f"wrote {out}; {served['total_failed']} of {served['total_requests']} requests failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
