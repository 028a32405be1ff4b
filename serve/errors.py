"""Domain errors raised by validation, logging and the engine seam.

The servicer maps each class to one gRPC status code, in one place. Messages are
written for the person who sent the request: what was wrong and what to do.
"""


class ApiError(Exception):
    """Base class: the request cannot be served as sent."""


class InvalidArgument(ApiError):
    """A field is missing, malformed, or over a limit."""


class NotFound(ApiError):
    """The referenced prompt is unknown, expired, or was not logged."""


class AlreadyExists(ApiError):
    """The user already judged this prompt, or an idempotency key was reused."""


class ResourceExhausted(ApiError):
    """The server is at a capacity limit; retry later."""


class Unavailable(ApiError):
    """A dependency (engine, Redis) is down; safe to retry."""


class Unauthenticated(ApiError):
    """No credential, or one that is unknown or revoked."""


class PermissionDenied(ApiError):
    """A valid credential whose role or state does not allow this call."""
