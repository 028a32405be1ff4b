"""`instructloop up`: the whole loop on one machine, as child processes.

    embedded Redis (DATA_DIR/redis, AOF)  <- shared by both
    instructloop serve  (DATA_DIR: the base model, store, admin token, user-token)
    instructloop learn  (DATA_DIR/learner: dataset, round state; DATA_DIR/store)

Start order: the default base model (copied from the package's shipped weights into
DATA_DIR/models/base on first start, or pretrained there when the package has none;
`--serve-args "--model DIR"` serves another),
Redis, the server (until it answers health checks: it registers v0), the local labeler
"local" (its credential in DATA_DIR/user-token, which the client commands read), then the
learner (a round needs `current`), then the web app (`--web-port`, `instructloop web`).
Stop order on Ctrl-C or SIGTERM: the web app, then the learner
(it finishes or abandons its round consistently), then the server (in-flight calls
finish), then Redis (it flushes its AOF). The children run in their own sessions, so the
terminal's Ctrl-C reaches only this process and the order holds; they also get SIGTERM
if this process dies. Everything lives under DATA_DIR, so a second `up` on the same
directory resumes: versions, the learner's dataset and the Redis streams survive.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from logging.handlers import RotatingFileHandler
from pathlib import Path

from instructloop.process import die_with_parent
from instructloop.redis_embedded import EmbeddedRedis

# Learner settings for the default base (2 layers, 128 wide, pretrained: instructloop/pretrain.py)
# on a few CPU cores: short answers (16 tokens), rounds every ~150 comparisons, SFT from
# the base at a learning rate that keeps what pretraining taught (on the shipped base,
# SFT alone, 250 steps, on 150 / 300 / 1,000 correct demonstrations gave 64% / 72% / 78%
# greedy exact-match; 1e-3 did worse than 3e-4 on an earlier base: measured), the reward model
# from the SFT policy, PPO-ptx on the demonstrations. The gate is the learner's own
# default (win rate > 0.55 against the serving version, KL to the reference < 20 nats).
# `--learn-args` overrides any of them (the last one wins).
TINY_LEARNER_ARGS = (
    "--heldout-fraction 0.2 --torch-threads 1 "
    "--min-comparisons 150 --max-wait-s 120 "
    "--gate-prompts 32 --gate-samples-per-prompt 2 "
    "--sft-min-demonstrations 16 --sft-max-steps 400 --sft-batch-size 16 "
    "--sft-learning-rate 3e-4 --sft-max-length 64 "
    "--rm-learning-rate 5e-4 --rm-batch-prompts 4 --rm-max-length 64 "
    "--ppo-iterations 32 --ppo-rollout-prompts 16 --ppo-minibatch-size 16 --ppo-ppo-epochs 2 "
    "--ppo-max-new-tokens 16 --ppo-max-prompt-length 32 --ppo-learning-rate 5e-5 "
    "--ppo-value-learning-rate 1e-4 --ppo-kl-beta 0.05 --ppo-ptx-coef 1.0"
)
STOP_TIMEOUT_S = {"learner": 180.0, "server": 60.0, "web": 15.0}
# The local loop puts every logged prompt with n >= 2 in the labeling queue, so the local
# labeler (`instructloop task next`) and `simulate --via-queue` have work at once; a
# server's own default is 0. `--serve-args '--queue-share 0.1'` overrides it.
QUEUE_SERVE_ARGS = ("--queue-share", "1")


def _default_data_dir() -> str:
    return os.environ.get("INSTRUCTLOOP_DATA_DIR", "./data")


@dataclass
class UpConfig:
    """The local loop: one Redis, one server, one learner, all state under --data-dir."""

    data_dir: str = field(
        default_factory=_default_data_dir,
        metadata={"help": "All state: Redis, model, store, learner dataset, logs, admin token."},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address the server listens on."})
    port: int = field(default=50051, metadata={"help": "gRPC port of the server."})
    metrics_port: int = field(default=9464, metadata={"help": "Prometheus port of the server."})
    enable_lora: bool = field(
        default=False,
        metadata={
            "help": "LoRA mode: the learner publishes adapters, the server serves them over "
            "v0's weights (pinning, canary). Default: full-weight versions."
        },
    )
    serve_args: str = field(
        default="", metadata={"help": "Extra `instructloop serve` options, e.g. '--model DIR'."}
    )
    learn_args: str = field(
        default="",
        metadata={"help": "Extra `instructloop learn` options; they override up's defaults."},
    )
    start_timeout_s: float = field(
        default=600.0, metadata={"help": "How long the server may take to start serving."}
    )
    log_max_mib: float = field(
        default=64.0,
        metadata={
            "help": "Each process's log under DATA_DIR/logs (server.log, learner.log, web.log) "
            "is rotated when it reaches this size."
        },
    )
    log_backups: int = field(
        default=3,
        metadata={
            "help": "Rotated logs kept per process (server.log.1 ...): a process's logs take at "
            "most (1 + this) x --log-max-mib."
        },
    )
    web_port: int = field(
        default=8080,
        metadata={
            "help": "Port of the web app (labeler page, playground, dashboard), started after "
            "the learner on --host; 0 starts none."
        },
    )


def _spawn(args: list[str], log_path: Path, max_bytes: int, backups: int) -> subprocess.Popen:
    """`instructloop ARGS` as a child whose stdout and stderr go, line by line, to
    log_path, rotated at max_bytes with `backups` older files (the stdlib's
    RotatingFileHandler, written from a thread of this process that reads the pipe)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "instructloop.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # the terminal's Ctrl-C is ours to forward, in order
        preexec_fn=die_with_parent,
    )
    handler = RotatingFileHandler(
        log_path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", errors="replace"
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    copier = threading.Thread(
        target=_copy_lines, args=(proc.stdout, handler), name=f"log {log_path.name}", daemon=True
    )
    copier.start()
    proc.log_copier = copier  # _stop joins it: the child's last lines reach the file
    return proc


def _copy_lines(pipe, handler: logging.Handler) -> None:
    """Until the child closes its end (it exited): each line to the handler."""
    try:
        for raw in iter(pipe.readline, b""):
            text = raw.decode("utf-8", "replace").rstrip("\n")
            handler.handle(logging.makeLogRecord({"msg": text, "levelno": logging.INFO}))
    finally:
        pipe.close()
        handler.close()


def _wait_serving(target: str, proc: subprocess.Popen, timeout: float, stop: threading.Event):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and not stop.is_set():
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            stop.wait(0.5)
    if not stop.is_set():
        raise TimeoutError(f"the server did not serve within {timeout:.0f}s")


def ensure_local_user(target: str, data: Path) -> str:
    """DATA_DIR/user-token: the credential of the local labeler "local", created through
    the Admin API on first start, so `instructloop generate` and `feedback` run as it.
    Returns the file's path."""
    from instructloop.clients.admin import AdminClient

    path = data / "user-token"
    if path.exists():
        return str(path)
    import grpc

    admin_token = (data / "admin-token").read_text().strip()
    try:
        with AdminClient(target, token=admin_token, actor="up") as admin:
            known = {u.user_id for u in admin.list_users().users}
            user = next(
                u for u in ("local", *(f"local-{i}" for i in range(2, 999))) if u not in known
            )
            token = admin.add_user(user, "labeler").token
    except grpc.RpcError as e:
        raise RuntimeError(f"cannot add the local user: {e.code().name}: {e.details()}") from None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"up: added the labeler {user!r}; its credential is {path}", file=sys.stderr)
    return str(path)


def _stop(name: str, proc: subprocess.Popen | None) -> int | None:
    """SIGTERM, wait, then SIGKILL if it will not stop. Returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        print(f"up: stopping the {name} (pid {proc.pid}) ...", file=sys.stderr, flush=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S[name])
        except subprocess.TimeoutExpired:
            print(f"up: the {name} did not stop in time; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
    proc.log_copier.join(timeout=5)
    return proc.returncode


def _ports_in_use(cfg: UpConfig) -> list[str]:
    """The server's ports that another process already listens on. Checked before
    anything starts: a server left running on --port would answer the health check in
    place of ours (which then fails to bind), and up would drive the wrong deployment.
    (A taken --web-port only leaves the loop without its pages, as before.)"""
    import socket

    taken = []
    for flag, port in (("--port", cfg.port), ("--metrics-port", cfg.metrics_port)):
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as s:
            # SO_REUSEADDR as the servers bind: a closed connection's TIME_WAIT does not
            # count, a listener does (Linux refuses it unless both set SO_REUSEPORT).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((cfg.host, port))
            except OSError:
                taken.append(f"{cfg.host}:{port} ({flag})")
    return taken


def run(cfg: UpConfig) -> int:
    if not (cfg.log_max_mib > 0 and cfg.log_backups >= 1):  # else the stdlib never rotates
        print("up: error: --log-max-mib must be > 0 and --log-backups >= 1", file=sys.stderr)
        return 2
    if taken := _ports_in_use(cfg):
        print(
            f"up: error: {', '.join(taken)} is in use: another server (an earlier `up`?) "
            "listens there; stop it or choose another port",
            file=sys.stderr,
        )
        return 2
    data = Path(cfg.data_dir).resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rotation = (int(cfg.log_max_mib * 2**20), cfg.log_backups)
    target = f"{cfg.host}:{cfg.port}"

    if "--model" not in shlex.split(cfg.serve_args):
        from instructloop.pretrain import ensure_base

        ensure_base(data / "models" / "base")  # the server's default model

    stop = threading.Event()

    def on_signal(signum, _frame):
        if not stop.is_set():
            print(f"\nup: {signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    redis = server = learner = web = None
    code = 0
    try:
        redis = EmbeddedRedis(data / "redis").start()
        print(f"up: redis {redis.url}", file=sys.stderr, flush=True)
        server = _spawn(
            [
                "serve", "--data-dir", str(data), "--redis-url", redis.url,
                "--host", cfg.host, "--port", str(cfg.port),
                "--metrics-port", str(cfg.metrics_port), "--log-format", "text",
                *(["--enable-lora"] if cfg.enable_lora else []),
                # One replica and no balancer: nothing to leave before a swap drains.
                "--swap-drain-grace-s", "0", "--no-rolling-swap",
                *QUEUE_SERVE_ARGS, *shlex.split(cfg.serve_args),
            ],
            logs / "server.log", *rotation,
        )  # fmt: skip
        print(f"up: starting the server (log {logs / 'server.log'}) ...", file=sys.stderr)
        _wait_serving(target, server, cfg.start_timeout_s, stop)
        if not stop.is_set():
            user_token = ensure_local_user(target, data)
            learner = _spawn(
                [
                    "learn", "--redis-url", redis.url, "--model-store", str(data / "store"),
                    "--data-dir", str(data / "learner"), "--consumer", "up",
                    "--kind", "lora" if cfg.enable_lora else "full",
                    *shlex.split(TINY_LEARNER_ARGS), *shlex.split(cfg.learn_args),
                ],
                logs / "learner.log", *rotation,
            )  # fmt: skip
            web_url = f"http://{cfg.host}:{cfg.web_port}/" if cfg.web_port else "-"
            if cfg.web_port and not importlib.util.find_spec("uvicorn"):
                web_url = "- (not installed: pip install -e '.[web]')"
            elif cfg.web_port:  # the pages over the gRPC API (instructloop web)
                web_args = ["--target", target, "--host", cfg.host, "--port", str(cfg.web_port)]
                web = _spawn(["web", *web_args], logs / "web.log", *rotation)
            metrics = f"http://{cfg.host}:{cfg.metrics_port}/metrics" if cfg.metrics_port else "-"
            print(
                "instructloop is up\n"
                f"  gRPC target   {target}    (INSTRUCTLOOP_TARGET={target})\n"
                f"  metrics       {metrics}\n"
                f"  web app       {web_url}    (sign in with a token below)\n"
                f"  admin token   {data / 'admin-token'}\n"
                f"  your token    {user_token}    (user 'local', labeler)\n"
                f"  data dir      {data}\n"
                f"  logs          {logs / 'server.log'}, {logs / 'learner.log'}\n"
                f"  try           instructloop simulate --target {target} --data-dir {data}\n"
                "Ctrl-C stops the web app, the learner, the server and Redis.",
                flush=True,
            )
        while not stop.is_set():
            if web is not None and web.poll() is not None:  # the pages are optional
                why = f"the web app exited with {web.returncode} (see {logs}/web.log)"
                print(f"up: {why}; the loop goes on without it", file=sys.stderr, flush=True)
                web = None
            for name, proc in (("server", server), ("learner", learner)):
                if proc is not None and proc.poll() is not None:
                    print(
                        f"up: the {name} exited with {proc.returncode} (see {logs}/{name}.log);"
                        " stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                    code = 1
                    stop.set()
            stop.wait(0.5)
    except (RuntimeError, TimeoutError) as e:
        print(f"up: error: {e} (see {logs})", file=sys.stderr)
        code = 1
    finally:
        # Later signals must not interrupt the ordered stop.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        for name, proc in (("web", web), ("learner", learner), ("server", server)):
            rc = _stop(name, proc)
            if rc not in (None, 0, -signal.SIGTERM) and code == 0:
                print(f"up: the {name} stopped with exit code {rc}", file=sys.stderr)
                code = 1
        if redis is not None:
            redis.stop()
        print("up: stopped", file=sys.stderr, flush=True)
    return code
