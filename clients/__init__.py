"""instructloop.clients: the typed Python SDK (sync and asyncio) and the client CLI.

Depends only on grpcio and the generated stubs in instructloop.v1, so apps can use it
without the server's or learner's dependencies.
"""

from .sdk import AsyncClient, Client, stream_deltas

__all__ = ["AsyncClient", "Client", "stream_deltas"]
