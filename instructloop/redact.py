"""Secrets out of what people read: URLs in logs and errors, defaults in --help."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL with its password (and a lone user token) replaced by '***':
    redis://:s3cret@host:6379/0 -> redis://:***@host:6379/0. A unix socket path and a URL
    without credentials come back unchanged; a password in the query string is redacted
    too."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if "@" not in parts.netloc and "password" not in parts.query.lower():
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if sep else f"***@{host}"
    query = "&".join(
        f"{k}=***" if k.lower() == "password" else f"{k}{eq}{v}"
        for k, eq, v in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
