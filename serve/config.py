"""Server configuration: one dataclass, parsed once at the entry point.

Every field is a command-line option of `instructloop serve` (underscores become dashes)
and can be set through the environment as INSTRUCTLOOP_<FIELD>.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_data_dir() -> str:
    return os.environ.get("INSTRUCTLOOP_DATA_DIR", "./data")


@dataclass
class Limits:
    """Input limits. Each one is checked before any work is done."""

    max_n: int = field(default=16, metadata={"help": "Most samples per Generate request."})
    max_tokens: int = field(default=512, metadata={"help": "Most tokens per sample."})
    default_max_tokens: int = field(
        default=64, metadata={"help": "Tokens per sample when a request sets max_tokens 0."}
    )
    max_prompt_tokens: int = field(default=1024, metadata={"help": "Most prompt tokens."})
    max_prompt_chars: int = field(
        default=16384, metadata={"help": "Most prompt characters (checked before tokenizing)."}
    )
    max_chat_messages: int = field(default=64, metadata={"help": "Most messages in a chat."})
    max_stop: int = field(default=8, metadata={"help": "Most stop strings per request."})
    max_stop_chars: int = field(default=64, metadata={"help": "Longest stop string."})
    max_logprobs: int = field(default=20, metadata={"help": "Most top logprobs per token."})
    max_id_chars: int = field(
        default=128, metadata={"help": "Longest user id, prompt id or idempotency key."}
    )
    max_demonstration_chars: int = field(
        default=16384, metadata={"help": "Longest demonstration text."}
    )
    rating_min: float = field(default=1.0, metadata={"help": "Lowest allowed rating score."})
    rating_max: float = field(default=7.0, metadata={"help": "Highest allowed rating score."})
    max_concurrent_requests: int = field(
        default=256,
        metadata={"help": "Generate calls in flight before new ones get RESOURCE_EXHAUSTED."},
    )
    max_message_bytes: int = field(
        default=1 << 20, metadata={"help": "Largest gRPC request message, in bytes."}
    )
    rate_limit_samples: str = field(
        default="3000/minute",
        metadata={
            "help": "Samples (the n of Generate calls) each user may ask for, as `limits` "
            "writes it: '3000/minute', or several joined by ';' ('600/minute;100000/day'). "
            "Over it: RESOURCE_EXHAUSTED with retry-after. Empty: no limit."
        },
    )
    rate_limit_feedback: str = field(
        default="120/minute;10000/day",
        metadata={"help": "SubmitFeedback calls each user may make (same notation)."},
    )
    rate_limit_tasks: str = field(
        default="120/minute",
        metadata={
            "help": "NextTask calls each user may make (same notation): the feedback pace, so "
            "a labeler may also poll an empty queue about once a second."
        },
    )
    max_skip_reason_chars: int = field(default=1024, metadata={"help": "Longest SkipTask reason."})


@dataclass
class QueueConfig:
    """The labeling queue (serve/queue.py): which logged prompts labelers are handed, to
    how many labelers each, and for how long."""

    queue_share: float = field(
        default=0.0,
        metadata={
            "help": "Share (0..1) of the logged prompts with n >= 2 that this replica puts in "
            "the labeling queue. 0 (the default) enqueues nothing: a deployment opts in "
            "once it has labelers, and one without them writes no queue keys. "
            "`instructloop up` sets 1."
        },
    )
    queue_overlap: int = field(
        default=1,
        metadata={
            "help": "Distinct labelers each item is handed to (InstructGPT measured "
            "agreement on overlapping items); kept per item from when it was enqueued."
        },
    )
    queue_lease_s: float = field(
        default=600.0,
        metadata={"help": "How long a NextTask lease lasts; then the item returns to the queue."},
    )
    queue_max: int = field(
        default=10_000,
        metadata={
            "help": "Most items waiting for a labeler; enqueueing one more drops the oldest "
            "(samples of older policies are worth less to the next reward model)."
        },
    )
    queue_scan: int = field(
        default=64,
        metadata={
            "help": "Candidates NextTask looks at: the oldest this many, then as many from a "
            "random place in the queue."
        },
    )
    queue_drop_cannot_rank: int = field(
        default=2,
        metadata={
            "help": "An item that this many distinct labelers cannot rank (SkipTask "
            "cannot_rank) leaves the queue: one may lack the knowledge, two say the item "
            "is broken."
        },
    )

    def check(self) -> None:
        """ValueError naming the option that is out of range."""
        if not 0.0 <= self.queue_share <= 1.0:
            raise ValueError(f"--queue-share must be in [0, 1], got {self.queue_share}")
        for name in ("queue_overlap", "queue_max", "queue_scan", "queue_drop_cannot_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.queue_lease_s <= 0:
            raise ValueError(f"--queue-lease-s must be positive, got {self.queue_lease_s}")


@dataclass
class ServerConfig:
    """How to run one server replica."""

    model: str = field(
        default="",
        metadata={
            "help": "HF-format model directory to serve. Empty: DATA_DIR/models/base, the "
            "default base, copied from the shipped weights on first start."
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)."})
    tls_cert: str = field(
        default="",
        metadata={
            "help": "PEM certificate chain of the gRPC port; with --tls-key the port speaks "
            "only TLS. Empty: plaintext (warned about unless --host is a loopback address)."
        },
    )
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert."})
    tls_client_ca: str = field(
        default="",
        metadata={"help": "PEM CA: clients must present a certificate it signed (mutual TLS)."},
    )
    data_dir: str = field(
        default_factory=_default_data_dir,
        metadata={"help": "Local state: embedded Redis, default model."},
    )
    redis_url: str = field(
        default="",
        metadata={
            "secret": True,
            "help": "Redis to log to: redis://[:PASSWORD@]host:6379/0 (rediss:// for TLS), "
            "a Redis Cluster as redis+cluster://host:port[,host:port], or the primary of "
            "Sentinels as redis+sentinel://host:26379[,host:port]/SERVICE. Empty: start an "
            "embedded redis-server with AOF persistence in DATA_DIR/redis.",
        },
    )
    redis_min_replicas_ack: int = field(
        default=0,
        metadata={
            "help": "After storing feedback, WAIT until this many Redis replicas have it "
            "before acknowledging; if fewer confirm within --redis-replica-ack-timeout-s the "
            "call fails UNAVAILABLE (retryable: the write may or may not survive a "
            "failover). For one Redis or Sentinel, not a Cluster. 0: off."
        },
    )
    redis_replica_ack_timeout_s: float = field(
        default=1.0,
        metadata={
            "help": "How long the WAIT of --redis-min-replicas-ack waits, in seconds (less "
            "than --redis-timeout-s)."
        },
    )
    embedded_redis_maxmemory: str = field(
        default="1gb",
        metadata={
            "help": "Memory bound of the embedded Redis (maxmemory, with noeviction: a full "
            "Redis refuses writes, it never evicts)."
        },
    )
    redis_timeout_s: float = field(
        default=2.0,
        metadata={
            "help": "Deadline of each Redis call, in seconds: a Redis that stops answering "
            "costs a Generate at most this long (then logged=false), feedback UNAVAILABLE."
        },
    )
    redis_breaker_cooldown_s: float = field(
        default=2.0,
        metadata={
            "help": "After 5 Redis timeouts in a row, Redis calls fail at once for this long "
            "(then are tried again) instead of each waiting its deadline (0: never)."
        },
    )
    redis_max_connections: int = field(
        default=64,
        metadata={
            "help": "Redis connections per replica; calls beyond it wait (within "
            "--redis-timeout-s) for a free one."
        },
    )
    redis_max_batch: int = field(
        default=256,
        metadata={
            "help": "Group commit: the feedback (or prompt logs) of concurrent calls go to "
            "Redis in one pipeline of at most this many, so one fsync covers them all (1: "
            "each call its own round trip)."
        },
    )
    prompt_cache_size: int = field(
        default=4096,
        metadata={
            "help": "Prompts this replica remembers after logging them (each until "
            "--prompt-ttl-s), so feedback on them needs no Redis read (0: none)."
        },
    )
    redis_prefix: str = field(
        default="instructloop", metadata={"help": "Prefix of every Redis key this deployment uses."}
    )
    prompt_ttl_s: int = field(
        default=7 * 24 * 3600,
        metadata={"help": "How long a logged prompt accepts feedback, in seconds."},
    )
    metrics_port: int = field(
        default=9464, metadata={"help": "Prometheus metrics HTTP port (0 disables it)."}
    )
    version: str = field(default="v0", metadata={"help": "Version id of the served base model."})
    model_store: str = field(
        default="",
        metadata={"help": "Published versions (a shared volume). Empty: DATA_DIR/store."},
    )
    open: bool = field(
        default=False,
        metadata={
            "help": "Open mode, for local experiments only: the public service takes calls "
            "without a credential and believes the user_id they name (anyone can then "
            "judge as anyone). Logged as a warning. Admin calls still need the admin token."
        },
    )
    auth_cache_s: float = field(
        default=5.0,
        metadata={
            "help": "How long a replica reuses a checked credential: a revoked or suspended "
            "user is refused at most this long after the change."
        },
    )
    admin_token: str = field(
        default="",
        metadata={
            "secret": True,
            "help": "Credential for the Admin service (env INSTRUCTLOOP_ADMIN_TOKEN). Empty: "
            "read DATA_DIR/admin-token, creating it (mode 0600) with a random token.",
        },
    )
    registry_key_file: str = field(
        default="",
        metadata={
            "help": "File holding the deployment's registry key: versions are loaded only if "
            "their registry entry is signed with it (every replica and the learner share the "
            "file). Empty: DATA_DIR/registry-key, created (mode 0600) on first use."
        },
    )
    enable_lora: bool = field(
        default=False,
        metadata={"help": "Serve LoRA versions (adapters over the full weights), canary, pinning."},
    )
    max_lora_rank: int = field(default=16, metadata={"help": "Largest LoRA rank accepted."})
    max_loras: int = field(default=4, metadata={"help": "LoRA versions held at once."})
    poll_interval_s: float = field(
        default=5.0,
        metadata={"help": "Registry poll period; pub/sub events act at once, polls catch misses."},
    )
    swap_drain_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "How long a full-weight swap waits for in-flight requests on the old "
            "weights; then it ends them with UNAVAILABLE (retry: the new version answers)."
        },
    )
    swap_drain_grace_s: float = field(
        default=2.0,
        metadata={
            "help": "Before a full-weight swap pauses and drains the engine, this replica "
            "reports NOT_SERVING (grpc.health and /healthz) for this long, so load "
            "balancers stop sending it new calls first; with --rolling-swap it keeps the "
            "turn as long again after SERVING, so they take it back before the next "
            "replica leaves. Set it to at least the balancer's check interval times its "
            "fall count (deploy/haproxy.cfg checks every 1 s and falls after 1; a "
            "Kubernetes readinessProbe needs periodSeconds x failureThreshold plus the "
            "endpoint update). 0: swap at once (one replica, or no balancer)."
        },
    )
    rolling_swap: bool = field(
        default=True,
        metadata={
            "help": "Take full-weight swaps one replica at a time across the fleet (a turn "
            "in Redis, renewed while swapping), so at most one replica is out of the "
            "balancer; meanwhile the others serve their old version, and every response "
            "names the version that produced it. LoRA swaps need no turn (no drain)."
        },
    )
    swap_turn_ttl_s: float = field(
        default=10.0,
        metadata={
            "help": "TTL of the swap turn; its holder renews it every third of it. A "
            "replica killed mid-swap holds the fleet's swaps up at most this long."
        },
    )
    swap_turn_wait_s: float = field(
        default=120.0,
        metadata={
            "help": "After waiting this long for the swap turn, a replica logs a warning "
            "naming the holder (and again each time as long), and keeps waiting while "
            "it serves its old version."
        },
    )
    kv_cache_gib: int = field(
        default=1, metadata={"help": "vLLM CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."}
    )
    max_model_len: int = field(
        default=0, metadata={"help": "Context length cap (0: the model's own)."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype for vLLM ('auto': the model's; float32 on a CPU engine)."},
    )
    cpu_placement: bool = field(
        default=True,
        metadata={
            "help": "On a CPU engine with bound worker cores: run this server and the embedded "
            "Redis on the cores the worker leaves free, away from the engine's busy-polling "
            "processes (see instructloop.serve.placement)."
        },
    )
    log_format: str = field(default="json", metadata={"help": "'json' or 'text' logs."})
    log_level: str = field(default="INFO", metadata={"help": "Logging level."})
    log_requests: bool = field(
        default=True,
        metadata={
            "help": "A log line per answered Generate, SubmitFeedback, NextTask and SkipTask "
            "call (logger instructloop.serve.requests, at INFO). Off: none; the prompts and "
            "feedback are in their Redis streams either way, failed calls are still logged."
        },
    )
    limits: Limits = field(default_factory=Limits)
    queue: QueueConfig = field(default_factory=QueueConfig)

    @property
    def store_dir(self) -> Path:
        return Path(self.model_store) if self.model_store else Path(self.data_dir) / "store"

    @property
    def model_dir(self) -> Path:
        return Path(self.model) if self.model else Path(self.data_dir) / "models" / "base"
