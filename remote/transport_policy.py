"""Where the client may send a bearer token, and which certificates it trusts.

A token sent over plain HTTP can be read by anyone on the path, and it is
the whole credential: whoever holds it can read and rewrite the library.
So a client that carries a token refuses an `http://` URL unless the host is
this machine (127.0.0.0/8, ::1, `localhost`, or the unspecified address, which
Linux connects to the loopback), or the user opted in with `--insecure-http`
(`insecure_http = true` in the configuration file). Host names are not
resolved to decide this: a DNS answer saying "127.0.0.1" proves nothing about
where the next lookup sends the token.

`https://` URLs are verified against the system's trust store, or only
against the CA certificates in `--ca-file` (a self-signed server's own
certificate works as its CA).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

INSECURE_HTTP_FLAG = "--insecure-http"


class TransportRefused(ValueError):
    """The URL and options would put the token at risk, or cannot work; the message says which flag fixes it."""


def is_local_host(host: str) -> bool:
    """True if connecting to `host` cannot leave this machine (decided without DNS)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True  # RFC 6761: resolvers must answer these with the loopback
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


def check_url(server_url: str, *, insecure_http: bool = False) -> None:
    """Raise TransportRefused unless a token may be sent to `server_url`."""
    parts = urlsplit(server_url)
    scheme = parts.scheme.lower()
    if scheme == "https":
        return
    if scheme != "http":
        raise TransportRefused(f"{server_url}: the URL must start with https:// or http://")
    host = parts.hostname or ""
    if is_local_host(host) or insecure_http:
        return
    raise TransportRefused(
        f"refusing to send the access token in clear text over http:// to {host}, which is not "
        f"this machine: use an https:// URL (the server runs `ferry serve --certfile F --keyfile K`), "
        f"or pass {INSECURE_HTTP_FLAG} if the network path is trusted (a VPN, an SSH tunnel)"
    )


def ssl_context(server_url: str, ca_file: Path | None = None) -> ssl.SSLContext | None:
    """The TLS settings for `server_url`: None for http://, else a verifying context.

    Without `ca_file` the system trust store is used (OpenSSL's default
    paths, as curl and the browser on this machine see them); with it, only
    the certificates in that file.
    """
    if urlsplit(server_url).scheme.lower() != "https":
        if ca_file is not None:
            log.warning("--ca-file %s is ignored: %s is not an https:// URL", ca_file, server_url)
        return None
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TransportRefused(
            f"cannot use CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}; "
            "give a PEM file with the server's CA certificate (or its self-signed certificate)"
        ) from exc


def describe_failure(exc: BaseException) -> str:
    """A transport failure in words; a TLS failure named as one, with what to do about it.

    httpx over trio reports a failed handshake as a `ConnectError` with an
    empty message; the `ssl` error that says why is further down the chain.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate not trusted ({seen.verify_message or seen}); if the server "
                "uses its own or a self-signed certificate, pass --ca-file with its CA certificate"
            )
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen}); is the URL's scheme right?"
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc or 'no detail'}"
