"""What this replica tells load balancers: grpc.health.v1 and an HTTP mirror of it.

The public service (and the overall "" entry) is SERVING while the engine answers and
no full-weight swap has taken the replica out: before a swap pauses and drains the
engine, the follower advertises NOT_SERVING (for --swap-drain-grace-s, so balancers stop
sending new calls), and SERVING again once the new weights serve, or the swap was
refused. Both inputs are kept here, so the periodic engine check cannot flip a replica
back to SERVING mid-swap. Balancers that cannot speak grpc.health (HAProxy 2.6) check
GET /healthz on the metrics port instead: 200 while SERVING, 503 otherwise.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServingHealth:
    def __init__(self, servicer: health.aio.HealthServicer, names: tuple[str, ...]) -> None:
        self.servicer = servicer
        self.names = names  # the entries this status is published under ("" and the service)
        self.engine_ok = False  # until the first engine check
        self.swapping = False
        self.stopping = False
        self.serving = False  # what was published last; read by the HTTP check's thread

    async def set_engine_ok(self, ok: bool) -> None:
        self.engine_ok = ok
        await self._publish()

    async def set_swapping(self, swapping: bool) -> None:
        self.swapping = swapping
        await self._publish()

    async def stop(self) -> None:
        """NOT_SERVING for good: the process is shutting down."""
        self.stopping = True
        await self._publish()

    async def _publish(self) -> None:
        serving = self.engine_ok and not self.swapping and not self.stopping
        for name in self.names:
            await self.servicer.set(name, SERVING if serving else NOT_SERVING)
        self.serving = serving
