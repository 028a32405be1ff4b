"""The server process: wires config, Redis, engine, servicer, health, reflection, metrics.

`run(cfg)` blocks until SIGINT/SIGTERM, then stops taking new calls, lets in-flight ones
finish (up to a grace period), and shuts the engine and the embedded Redis down.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from instructloop.keys import Keys
from instructloop.redact import redact_url
from instructloop.redis_embedded import EmbeddedRedis
from instructloop.registry import Registry, load_registry_key, now_ts
from instructloop.store import ModelStore
from instructloop.users import UserStore
from instructloop.v1 import admin_pb2, admin_pb2_grpc, api_pb2, api_pb2_grpc

from . import placement
from .admin import AdminServicer
from .auth import Authenticator
from .config import ServerConfig
from .engine import EngineError, VllmEngine, lora_unsupported
from .errors import Unavailable
from .health import ServingHealth
from .logstore import LogStore, RedisSettingsError
from .metrics import Metrics
from .queue import LabelingQueue
from .ratelimit import RateLimiter, parse_limits
from .servicer import InstructLoopServicer, requests_log
from .swapturn import SwapTurn
from .versions import VersionFollower

log = logging.getLogger("instructloop.serve")
SERVICE_NAME = api_pb2.DESCRIPTOR.services_by_name["InstructLoop"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
# Health of prompt and feedback logging alone: NOT_SERVING while Redis does not answer.
LOGGING_HEALTH = "instructloop.logging"
HEALTH_INTERVAL_S = 5.0
SHUTDOWN_GRACE_S = 10.0


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def ensure_model(cfg: ServerConfig) -> Path:
    """The model directory; the default base is copied (or pretrained) on first use."""
    path = cfg.model_dir
    if (path / "config.json").exists():
        return path
    if cfg.model:
        raise SystemExit(f"error: --model {path} is not an HF model directory (no config.json)")
    from instructloop.pretrain import ensure_base

    return ensure_base(path)


def admin_token(cfg: ServerConfig) -> str:
    """The configured token, else the one in DATA_DIR/admin-token (created on first use)."""
    if cfg.admin_token:
        return cfg.admin_token
    path = Path(cfg.data_dir) / "admin-token"
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            # hex: a token that starts with '-' would read as an option on a command line
            f.write(secrets.token_hex(32) + "\n")
        log.info("created an admin token", extra={"path": str(path)})
    return path.read_text().strip()


async def _watch_health(
    serving: ServingHealth,
    engine: VllmEngine,
    store: LogStore,
    metrics: Metrics,
) -> None:
    """The service is SERVING while the engine answers and no full-weight swap drains it
    (ServingHealth keeps both, so this loop cannot end a swap's NOT_SERVING). Redis being
    down degrades it (prompts are not logged, feedback is UNAVAILABLE) but does not take
    the replica out of a load balancer: it shows as NOT_SERVING under LOGGING_HEALTH, in
    instructloop_redis_up and in the logs. Each ping has the Redis deadline, so a Redis
    that stops answering cannot stall this loop."""
    health_servicer = serving.servicer
    last_logging = None
    while True:
        try:
            await engine.check_health()
            engine_ok = True
        except EngineError as e:
            engine_ok = False
            log.error("engine unhealthy", extra={"error": str(e)})
        try:
            await store.ping()
            metrics.redis_up.set(1)
            logging_status = health_pb2.HealthCheckResponse.SERVING
        except Unavailable as e:
            metrics.redis_up.set(0)
            logging_status = health_pb2.HealthCheckResponse.NOT_SERVING
            log.warning("redis unreachable", extra={"error": str(e)})
        if logging_status != last_logging:
            await health_servicer.set(LOGGING_HEALTH, logging_status)
            last_logging = logging_status
        await serving.set_engine_ok(engine_ok)
        await asyncio.sleep(HEALTH_INTERVAL_S)


async def serve(cfg: ServerConfig) -> None:
    model_dir = ensure_model(cfg)
    redis_proc = None
    redis_url = cfg.redis_url
    if not redis_url:
        redis_proc = EmbeddedRedis(
            Path(cfg.data_dir) / "redis", maxmemory=cfg.embedded_redis_maxmemory
        ).start()
        redis_url = redis_proc.url
    metrics = Metrics()
    try:  # a --redis-url that names no Redis, or options that do not fit it
        store = LogStore(
            redis_url,
            Keys(cfg.redis_prefix),
            cfg.prompt_ttl_s,
            timeout_s=cfg.redis_timeout_s,
            max_connections=cfg.redis_max_connections,
            breaker_cooldown_s=cfg.redis_breaker_cooldown_s,
            prompt_cache_size=cfg.prompt_cache_size,
            max_batch=cfg.redis_max_batch,
            min_replicas_ack=cfg.redis_min_replicas_ack,
            replica_ack_timeout_s=cfg.redis_replica_ack_timeout_s,
        )
    except ValueError as e:
        if redis_proc is not None:
            redis_proc.stop()
        raise SystemExit(f"error: {e}") from None
    try:
        for warning in await store.check_settings():
            log.warning("redis settings: %s", warning)
        await store.migrate_layout()
    except RedisSettingsError as e:
        await store.close()
        if redis_proc is not None:
            redis_proc.stop()
        raise SystemExit(f"error: {e}") from None
    # Bind both ports before the engine's slow start, so nothing can take them meanwhile.
    try:
        rate_limits = {
            "samples": parse_limits(cfg.limits.rate_limit_samples, "--rate-limit-samples"),
            "feedback": parse_limits(cfg.limits.rate_limit_feedback, "--rate-limit-feedback"),
            "tasks": parse_limits(cfg.limits.rate_limit_tasks, "--rate-limit-tasks"),
        }
        store.queue = LabelingQueue(store, cfg.queue, cfg.limits)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    too_low = [i for i in rate_limits["samples"] if i.amount < cfg.limits.max_n]
    if too_low:
        raise SystemExit(
            f"error: --rate-limit-samples {too_low[0]} is below --max-n {cfg.limits.max_n}: "
            "a Generate call with n = max-n could never be admitted"
        )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", cfg.limits.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    port = _add_port(server, cfg)
    if port == 0:
        raise SystemExit(f"error: cannot listen on {cfg.host}:{cfg.port} (in use?)")
    health_servicer = health.aio.HealthServicer()
    serving = ServingHealth(health_servicer, ("", SERVICE_NAME))
    # "" starts SERVING in grpc's servicer: NOT_SERVING until the engine's first check.
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    metrics.serve_http(cfg.host, cfg.metrics_port, serving=lambda: serving.serving)
    if cfg.enable_lora and (why := lora_unsupported(str(model_dir))):
        raise SystemExit(
            f"error: --enable-lora: {why}; start without it and have the learner publish "
            "full-weight versions (learn --kind full)"
        )
    engine = VllmEngine(
        str(model_dir),
        version=cfg.version,
        max_model_len=cfg.max_model_len,
        kv_cache_gib=cfg.kv_cache_gib,
        dtype=cfg.dtype,
        enable_lora=cfg.enable_lora,
        max_lora_rank=cfg.max_lora_rank,
        max_loras=cfg.max_loras,
        drain_timeout_s=cfg.swap_drain_timeout_s,
    )
    if cfg.cpu_placement:
        _place(redis_proc)
    metrics.track_engine(engine.num_unfinished_requests)
    metrics.set_version(engine.version)
    key_file = cfg.registry_key_file or str(Path(cfg.data_dir) / "registry-key")
    registry = Registry(store.redis, Keys(cfg.redis_prefix), load_registry_key(key_file))
    model_store = ModelStore(cfg.store_dir)
    follower = VersionFollower(
        engine, registry, model_store, metrics, cfg.poll_interval_s,
        health=serving, drain_grace_s=cfg.swap_drain_grace_s,
    )  # fmt: skip
    if cfg.rolling_swap:
        follower.turn = SwapTurn(
            store.redis, Keys(cfg.redis_prefix).swap_turn, follower.replica_id,
            ttl_s=cfg.swap_turn_ttl_s, wait_log_s=cfg.swap_turn_wait_s,
        )  # fmt: skip
    base = admin_pb2.VersionInfo(
        id=cfg.version, kind="base", base_model=str(model_dir), path=str(model_dir),
        created=now_ts(),
    )  # fmt: skip
    await follower.start(base)
    users = UserStore(store.redis, Keys(cfg.redis_prefix))
    auth = Authenticator(users, admin_token(cfg), cache_s=cfg.auth_cache_s, open_mode=cfg.open)
    if cfg.open:
        log.warning(
            "open mode (--open): the public service takes calls without a credential and "
            "believes the user_id they name; anyone who reaches the port can judge as anyone. "
            "For local experiments only."
        )
    rate = RateLimiter(
        redis_url, store.redis, Keys(cfg.redis_prefix).rate_prefix(), rate_limits,
        cfg.redis_timeout_s,
        on_unchecked=metrics.rate_unchecked.inc,
    )  # fmt: skip
    servicer = InstructLoopServicer(
        engine, store, cfg.limits, metrics, follower, auth=auth, rate=rate, queue=store.queue
    )
    api_pb2_grpc.add_InstructLoopServicer_to_server(servicer, server)
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminServicer(registry, model_store, users, auth), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    # Everything built so far (vLLM, torch, transformers, the tokenizer) lives as long as the
    # process. Freezing it keeps the collector from walking it again: on the tiny model a
    # full collection of that heap stalled the event loop ~330 ms, several times a minute
    # under load (measured), and every request in flight waited for it.
    gc.collect()
    gc.freeze()
    await server.start()
    watcher = asyncio.create_task(_watch_health(serving, engine, store, metrics))
    log.info(
        "serving",
        extra={
            "target": f"{cfg.host}:{port}",
            "tls": bool(cfg.tls_cert),
            "model": str(model_dir),
            "version": engine.version,
            "replica": follower.replica_id,
            "mode": follower.mode,
            "store": str(model_store.root),
            "redis": redact_url(redis_url),
            "metrics": f"http://{cfg.host}:{cfg.metrics_port}/metrics" if cfg.metrics_port else "",
        },
    )
    print(
        f"instructloop serving {engine.version} on {cfg.host}:{port}", file=sys.stderr, flush=True
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping: finishing in-flight calls", extra={"grace_s": SHUTDOWN_GRACE_S})
        await serving.stop()
        await server.stop(SHUTDOWN_GRACE_S)
    finally:
        watcher.cancel()
        await follower.stop()
        await store.close()
        engine.shutdown()
        if redis_proc is not None:
            redis_proc.stop()
        log.info("stopped")


def _add_port(server: grpc.aio.Server, cfg: ServerConfig) -> int:
    """The gRPC port: TLS with --tls-cert/--tls-key (mutual with --tls-client-ca)."""
    address = f"{cfg.host}:{cfg.port}"
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    if not cfg.tls_cert:
        if cfg.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "serving plaintext gRPC on %s: the admin token and user data cross the network "
                "in the clear; use --tls-cert and --tls-key",
                cfg.host,
            )
        return server.add_insecure_port(address)
    try:
        key, cert = Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes()
        client_ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    except OSError as e:
        raise SystemExit(f"error: cannot read a TLS file: {e}") from None
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    return server.add_secure_port(address, credentials)


def _place(redis_proc: EmbeddedRedis | None) -> None:
    others = [redis_proc.proc.pid] if redis_proc is not None and redis_proc.proc else []
    try:
        p = placement.place([os.getpid()], others)
    except (OSError, psutil.Error) as e:  # a container may forbid it; serving goes on
        log.warning("cpu placement skipped: %s", e)
        return
    if p is None:
        log.info("cpu placement: nothing to move (no bound CPU worker, or no free core)")
        return
    log.info(
        "cpu placement: front end%s on cores %s, engine core on %s",
        " and embedded Redis" if others else "", sorted(p.frontend), sorted(p.engine_core),
    )  # fmt: skip


def run(cfg: ServerConfig) -> int:
    setup_logging(cfg.log_format, cfg.log_level)
    if not cfg.log_requests:
        requests_log.setLevel(logging.WARNING)
    asyncio.run(serve(cfg))
    return 0
