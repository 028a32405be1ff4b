"""The systems bench/serve.py measures: each starts, yields a `System` (a call that sends
one prompt and returns the generated tokens, and the pid of its API front end), and
stops on exit. See bench/serve.py's docstring for what each one is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

SYSTEMS = ("inproc", "seam", "grpc", "vllm-serve")
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default reservation fails on these machines
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}

Call = Callable[[str], Awaitable[int]]  # prompt -> generated tokens (all n samples)


class System(NamedTuple):
    call: Call
    frontend_pid: int  # the process that runs the API front end: this one when in-process
    # --stream: each call appends its StreamClock here (time to first token, token gaps)
    streams: list | None = None


class StreamClock:
    """When a streamed reply's chunks arrive: time to the first text of any sample, and the
    gaps between successive chunks of each sample (inter-token latency; a chunk may carry
    more than one token)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.gaps: list[float] = []
        self._last: dict[int, float] = {}

    def chunk(self, index: int) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.t0
        if index in self._last:
            self.gaps.append(now - self._last[index])
        self._last[index] = now


# ---- subprocesses ------------------------------------------------------------------------


class Proc:
    """A server subprocess in its own process group (vLLM forks engine-core children)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path):
        self.name, self.log_path = name, log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **ENGINE_ENV),
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the group (the server shuts its engine down), SIGKILL what is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group
        self.proc.wait()


async def wait_until(ready: Callable[[], Awaitable[bool]], proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        with contextlib.suppress(Exception):
            if await ready():
                return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{proc.name} not ready after {timeout:.0f}s:\n{proc.tail()}")


# ---- the systems -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def inproc_system(model: str, args: argparse.Namespace) -> AsyncIterator[System]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=model,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            dtype=args.dtype,
            enforce_eager=True,
            disable_log_stats=True,
        )
    )
    params = SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        output_kind=RequestOutputKind.DELTA if args.stream else RequestOutputKind.FINAL_ONLY,
    )
    streams: list[StreamClock] | None = [] if args.stream else None

    async def call(prompt: str) -> int:
        final, tokens, clock = None, 0, StreamClock()
        async for out in llm.generate(prompt, params, uuid.uuid4().hex):
            final = out
            if streams is not None:
                for o in out.outputs:
                    if o.token_ids:
                        clock.chunk(o.index)
                        tokens += len(o.token_ids)
        if streams is None:
            return sum(len(o.token_ids) for o in final.outputs)
        streams.append(clock)
        return tokens

    try:
        yield System(call, os.getpid(), streams)
    finally:
        llm.shutdown()


@contextlib.asynccontextmanager
async def seam_system(model: str, args: argparse.Namespace) -> AsyncIterator[System]:
    from instructloop.serve.engine import SamplingSpec, VllmEngine

    engine = VllmEngine(
        model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, dtype=args.dtype
    )
    spec = SamplingSpec(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature)

    streams: list[StreamClock] | None = [] if args.stream else None

    async def call(prompt: str) -> int:
        tokens, clock = 0, StreamClock()
        async with engine.leases([None]) as (lease,):  # as the servicer does: fixes the version
            ids = engine.encode(prompt)
            async for deltas in engine.generate(uuid.uuid4().hex, ids, spec, lease):
                for d in deltas:
                    if d.token_ids:
                        clock.chunk(d.index)
                        tokens += len(d.token_ids)
        if streams is not None:
            streams.append(clock)
        return tokens

    try:
        yield System(call, os.getpid(), streams)
    finally:
        engine.shutdown()


@contextlib.asynccontextmanager
async def grpc_system(model: str, args: argparse.Namespace, workdir: Path) -> AsyncIterator[System]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from instructloop.clients.wire import stream_deltas
    from instructloop.redis_embedded import free_port
    from instructloop.v1 import api_pb2, api_pb2_grpc

    server = None
    try:
        port = free_port()
        cmd = [
            sys.executable, "-m", "instructloop.cli", "serve",
            "--model", model,
            "--port", str(port),
            "--metrics-port", "0",
            "--data-dir", str(workdir / "grpc-data"),
            "--log-format", "text",
            "--max-model-len", str(args.max_model_len),
            "--dtype", args.dtype,
            "--cpu-placement" if args.cpu_placement else "--no-cpu-placement",
            # Serving is measured alone, like vLLM's own server: no credentials, no
            # per-user rate limit on the load generator's one user.
            "--open", "--rate-limit-samples", "",
            *shlex.split(args.grpc_serve_args),
        ]  # fmt: skip
        server = Proc("grpc server", cmd, workdir / "grpc-server.log")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            await wait_until(serving, server, args.start_timeout)
            stub = api_pb2_grpc.InstructLoopStub(channel)
            sampling = api_pb2.SamplingParams(
                max_tokens=args.max_tokens, temperature=args.temperature
            )

            streams: list[StreamClock] | None = [] if args.stream else None

            async def call(prompt: str) -> int:
                request = api_pb2.GenerateRequest(
                    prompt=prompt,
                    n=args.n,
                    sampling=sampling,
                    user_id="bench",
                    do_not_log=args.grpc_do_not_log,
                    step_deltas=not args.grpc_per_sample_deltas,
                )
                if streams is None:
                    reply = await stub.Generate(request, timeout=args.request_timeout)
                    return sum(s.token_count for s in reply.samples)
                tokens, clock = 0, StreamClock()
                async for event in stub.GenerateStream(request, timeout=args.request_timeout):
                    for delta in stream_deltas(event):
                        if delta.token_count:
                            clock.chunk(delta.index)
                            tokens += delta.token_count
                streams.append(clock)
                return tokens

            yield System(call, server.proc.pid, streams)
    finally:
        if server is not None:
            server.stop()


@contextlib.asynccontextmanager
async def vllm_serve_system(
    model: str, args: argparse.Namespace, workdir: Path
) -> AsyncIterator[System]:
    import aiohttp

    from instructloop.redis_embedded import free_port

    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(args.max_num_seqs),
        "--dtype", args.dtype,
        "--enforce-eager",
        "--disable-log-stats",
    ]  # fmt: skip
    server = Proc("vllm-serve", cmd, workdir / "vllm-serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        timeout = aiohttp.ClientTimeout(total=args.request_timeout)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def healthy() -> bool:
                async with session.get(f"{base}/health") as r:
                    return r.status == 200

            await wait_until(healthy, server, args.start_timeout)

            streams: list[StreamClock] | None = [] if args.stream else None

            async def call(prompt: str) -> int:
                body = {
                    "model": model,
                    "prompt": prompt,
                    "n": args.n,
                    "max_tokens": args.max_tokens,
                    "temperature": args.temperature,
                    "ignore_eos": args.ignore_eos,
                }
                if streams is not None:
                    body.update(stream=True, stream_options={"include_usage": True})
                clock, tokens = StreamClock(), 0
                async with session.post(f"{base}/v1/completions", json=body) as r:
                    if r.status != 200:
                        raise RuntimeError(f"vllm-serve HTTP {r.status}: {await r.text()}")
                    if streams is None:
                        return (await r.json())["usage"]["completion_tokens"]
                    async for line in r.content:  # server-sent events, one per line
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        chunk = json.loads(line[6:])
                        for choice in chunk.get("choices", ()):
                            if choice.get("text"):
                                clock.chunk(choice["index"])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                streams.append(clock)
                return tokens

            yield System(call, server.proc.pid, streams)
    finally:
        server.stop()


def open_system(name: str, model: str, args: argparse.Namespace, workdir: Path):
    if name == "inproc":
        return inproc_system(model, args)
    if name == "seam":
        return seam_system(model, args)
    if name == "grpc":
        return grpc_system(model, args, workdir)
    return vllm_serve_system(model, args, workdir)
