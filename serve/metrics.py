"""Prometheus metrics of one server replica, in a registry of its own.

Tokens per second is `rate(instructloop_generated_tokens_total[1m])`; per request it is
also observed in instructloop_request_tokens_per_second.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SWAP_PHASE_BUCKETS = (0.001, 0.0025, 0.005, *LATENCY_BUCKETS)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "instructloop_requests", "RPCs by method and status code.", ["method", "code"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "instructloop_request_latency_seconds", "RPC latency by method.", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "instructloop_generated_tokens", "Tokens generated, all samples.", registry=r
        )
        self.tokens_per_second = Histogram(
            "instructloop_request_tokens_per_second", "Generated tokens / latency per request.",
            buckets=(10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000), registry=r,
        )  # fmt: skip
        self.feedback = Counter(
            "instructloop_feedback", "Feedback by kind and result.", ["kind", "result"],
            registry=r,
        )  # fmt: skip
        self.prompts_logged = Counter(
            "instructloop_prompts_logged", "Generate calls logged to Redis, by result.",
            ["result"], registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "instructloop_inflight_requests", "Generate calls in progress.", registry=r
        )
        self.served_version = Gauge(
            "instructloop_served_version", "1 for the version this replica serves.", ["version"],
            registry=r,
        )  # fmt: skip
        self.redis_up = Gauge(
            "instructloop_redis_up", "1 while Redis answers (prompt logging, feedback).", registry=r
        )
        self.engine_unfinished = Gauge(
            "instructloop_engine_unfinished_requests", "Requests inside the engine.", registry=r
        )

        self.rate_limited = Counter(
            "instructloop_rate_limited",
            "Calls refused with RESOURCE_EXHAUSTED for a user over a rate limit or quota, by "
            "kind (samples, feedback).",
            ["kind"],
            registry=r,
        )
        self.rate_unchecked = Counter(
            "instructloop_rate_unchecked",
            "Calls admitted without a rate-limit check because Redis did not answer.",
            registry=r,
        )

        self.swaps = Counter(
            "instructloop_swaps", "Version swaps by mode and result (ok, refused).",
            ["mode", "result"], registry=r,
        )  # fmt: skip
        self.swap_phase_seconds = Histogram(
            "instructloop_swap_phase_seconds",
            "Parts of a version swap: event (age of a registry event when it arrives), "
            "verify (signature and checksums), turn (full swaps with --rolling-swap: "
            "waiting for the fleet's swap turn), grace (full: NOT_SERVING before the "
            "drain, and again after it while holding the turn), drain (full swaps: "
            "in-flight requests finish), load (full: pause + reload_weights + resume; "
            "LoRA: add_lora).",
            ["phase"], buckets=SWAP_PHASE_BUCKETS, registry=r,
        )  # fmt: skip
        self.swap_seconds = Histogram(
            "instructloop_swap_seconds", "Verify + load time of a version swap, by kind.",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def track_engine(self, unfinished: Callable[[], int]) -> None:
        self.engine_unfinished.set_function(unfinished)

    def set_version(self, version: str) -> None:
        self.served_version.clear()
        self.served_version.labels(version).set(1)

    def serve_http(self, host: str, port: int, serving: Callable[[], bool] | None = None) -> None:
        """GET /metrics (Prometheus's text format) on host:port, in a thread; with
        `serving`, GET /healthz too: 200 while it returns True, else 503 (for balancers
        that cannot check grpc.health, as HAProxy 2.6 cannot)."""
        if not port:
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = _HTTPServer((host, port), _handler(self.registry, serving), family)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, family: int) -> None:
        self.address_family = family
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """Health checkers close at once once they have the status (HAProxy resets the
        connection): not worth a traceback each second. Anything else still gets one."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(registry: CollectorRegistry, serving: Callable[[], bool] | None) -> type:
    class Handler(MetricsHandler):
        def do_GET(self) -> None:
            if serving is None or urlparse(self.path).path != "/healthz":
                return super().do_GET()
            ok = serving()
            body = b"SERVING\n" if ok else b"NOT_SERVING\n"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    Handler.registry = registry
    return Handler
