"""Fetching catalogue images from URLs without letting a URL reach an internal address (SSRF).

Policy, in the order it is applied:

* The URL must be well formed: http or https, at most 2048 characters, no userinfo, a valid
  port, and a host that is an IP literal or an ASCII/IDNA DNS name within the DNS limits.
  Anything else is ``PoisonMessage``: the same URL will never pass.
* The host is resolved ONCE and every address it resolves to is checked. Unless
  ``allow_private`` is set (trusted internal catalogues, tests), every address must be
  globally routable unicast; loopback, private, link-local (cloud metadata), CGNAT,
  multicast, reserved, documentation and every IPv6 form that embeds an IPv4 address are
  refused. The connection then goes only to one of those checked addresses: the HTTP
  library never resolves the name again, so DNS rebinding cannot slip in between check and
  connect. TLS still uses the host name for SNI and certificate verification.
* One attempt, one total deadline (``timeout_s``) for connect, TLS, headers and body
  together. Redirects are not followed and no proxy is used.
* 200 gives the body. 5xx, 429, transport errors and the deadline are
  ``SourceUnavailable`` (the runner retries the record a bounded number of times). Every
  other status and a body over ``max_bytes`` are ``PoisonMessage``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import ssl
import string
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httpcore
import httpx

from lookalike.shared.errors import PoisonMessage, SourceUnavailable

MAX_URL_LENGTH = 2048
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")  # one DNS label, at most 63 chars
_DEFAULT_PORTS = {"http": 80, "https": 443}

# IPv6 ranges that carry an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo): whatever
# IPv4 address they embed, the packet may end up there, so they are refused outright.
# Plus ranges Python 3.11's ``is_global`` still calls global (IETF protocol assignments,
# deprecated site-local, the newer IPv6 documentation prefix) and CGNAT, named for clarity.
_REFUSED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "::ffff:0:0/96", "::/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32",
        "192.0.0.0/24", "100.64.0.0/10", "fec0::/10", "3fff::/20",
    )
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(ip: Address) -> bool:
    """True only for globally routable unicast addresses."""
    if any(ip.version == net.version and ip in net for net in _REFUSED_NETWORKS):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (only ``sockaddrs``) and what to ask for."""

    scheme: str
    host: str  # ASCII: IDNA-encoded name or IP literal without brackets
    port: int
    target: str  # path and query, percent-encoded
    sockaddrs: tuple[tuple[int, tuple], ...]  # (family, sockaddr) from the single resolution

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) of every TCP address of ``host``: the one DNS lookup of a fetch."""
    return [(info[0], info[4]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def check_url(url: str, allow_private: bool = False) -> Target:
    """Validate ``url``, resolve its host once and check every address; the checked target.

    Raises ``PoisonMessage`` for a malformed or refused URL, ``SourceUnavailable`` when the
    resolver fails temporarily.
    """
    shown = repr(url[:200]) if isinstance(url, str) else repr(type(url))

    def refuse(why: str) -> PoisonMessage:
        return PoisonMessage(f"refused URL {shown}: {why}")

    if not isinstance(url, str) or not url:
        raise refuse("not a URL")
    if len(url) > MAX_URL_LENGTH:
        raise refuse(f"longer than {MAX_URL_LENGTH} characters")
    # urlsplit silently drops tabs and newlines; refuse them rather than guess what was meant.
    if any(c <= " " or c == "\x7f" for c in url):
        raise refuse("contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as e:
        raise refuse(f"malformed ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise refuse("only http and https URLs are fetched")
    if "@" in parts.netloc:
        raise refuse("credentials in URLs are not accepted")
    if port == 0:
        raise refuse("port 0")
    port = port or _DEFAULT_PORTS[scheme]
    host = _ascii_host(parts.hostname or "", parts.netloc.startswith("["), refuse)

    try:
        sockaddrs = resolve(host, port)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:  # the resolver is struggling, not the name
            raise SourceUnavailable(f"cannot resolve {host} for {shown} now: {e}") from None
        raise refuse(f"host {host} does not resolve ({e})") from None
    except (OSError, UnicodeError) as e:
        raise refuse(f"host {host} cannot be resolved ({e})") from None
    if not sockaddrs:
        raise refuse(f"host {host} has no address")
    for _, sockaddr in sockaddrs:
        ip = ipaddress.ip_address(sockaddr[0])
        if not allow_private and not is_public(ip):
            raise refuse(f"{host} resolves to non-public address {ip}")

    # Only non-ASCII is percent-encoded: h11 accepts every other visible ASCII character.
    target = quote(parts.path or "/", safe=string.punctuation)
    if parts.query:
        target += "?" + quote(parts.query, safe=string.punctuation)
    return Target(scheme, host, port, target, tuple(sockaddrs))


def _ascii_host(host: str, bracketed: bool, refuse: typing.Callable[[str], PoisonMessage]) -> str:
    """The host as it goes on the wire: an IP literal or an IDNA-encoded, length-checked name."""
    if not host:
        raise refuse("no host")
    if bracketed:  # [..] must hold an IPv6 address, and no zone id: it means nothing off this machine
        if "%" in host:
            raise refuse(f"IPv6 zone ids are not accepted ([{host}])")
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise refuse(f"bad IPv6 literal [{host}]") from None
    try:
        name = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as e:
        raise refuse(f"host is not a valid international domain name ({e})") from None
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise refuse(f"host {name[:80]!r} is not a valid DNS name")
    return name


def fetch_url(url: str, max_bytes: int, timeout_s: float, allow_private: bool = False) -> bytes:
    """The body of a 200 answer to one GET of ``url``, within ``timeout_s`` in total.

    ``PoisonMessage``: malformed or refused URL, status other than 200/429/5xx, body over
    ``max_bytes``. ``SourceUnavailable``: 5xx, 429, transport error, total deadline passed.
    """
    deadline = time.monotonic() + timeout_s
    target = check_url(url, allow_private)
    shown = url[:200]
    pool = httpcore.ConnectionPool(
        ssl_context=_ssl_context(), network_backend=_PinnedBackend(target, deadline), retries=0, max_connections=1
    )
    url_ = httpcore.URL(scheme=target.scheme.encode(), host=target.host.encode(), port=target.port,
                        target=target.target.encode())
    headers = {"Host": target.host_header, "User-Agent": "lookalike-fetch/1", "Accept": "image/*",
               "Accept-Encoding": "identity"}
    try:
        with pool, pool.stream("GET", url_, headers=headers) as resp:
            status = resp.status
            if status >= 500 or status == 429:
                raise SourceUnavailable(f"GET {shown} answered {status}")
            if status != 200:  # 3xx included: redirects could point anywhere, so they are not followed
                raise PoisonMessage(f"GET {shown} answered {status}")
            length = dict((k.lower(), v) for k, v in resp.headers).get(b"content-length", b"")
            if length.isdigit() and int(length) > max_bytes:
                raise PoisonMessage(f"image at {shown} is larger than {max_bytes} bytes (Content-Length {int(length)})")
            chunks, size = [], 0
            for chunk in resp.iter_stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PoisonMessage(f"image at {shown} is larger than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpcore.TimeoutException:
        # Every socket wait is capped at the time left, so any timeout is the total deadline.
        raise SourceUnavailable(f"GET {shown} exceeded the total deadline of {timeout_s:g} s") from None
    except (httpcore.NetworkError, httpcore.ProtocolError) as e:
        raise SourceUnavailable(f"GET {shown} failed: {type(e).__name__}: {e}") from None


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """Verifying TLS context (certifi roots, as httpx uses), built once."""
    return httpx.create_ssl_context()


@contextmanager
def _mapped(timeout_error: type[Exception], other_error: type[Exception]):
    """Turn socket errors into httpcore's, which httpcore and ``fetch_url`` understand."""
    try:
        yield
    except TimeoutError as e:
        raise timeout_error(e) from e
    except OSError as e:  # ssl.SSLError (bad certificate, handshake) included
        raise other_error(e) from e


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every wait is capped by the fetch's total deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def _arm(self, timeout: float | None, timeout_error: type[Exception]) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise timeout_error("total deadline passed")
        self._sock.settimeout(left if timeout is None else min(timeout, left))

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            self._arm(timeout, httpcore.ReadTimeout)
            return self._sock.recv(max_bytes)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            self._arm(timeout, httpcore.WriteTimeout)
            self._sock.sendall(buffer)  # the timeout bounds the whole sendall, not each send

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        # httpcore passes the URL's host name here (not the IP we connected to): SNI and
        # certificate verification are for the name.
        with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
            try:
                self._arm(timeout, httpcore.ConnectTimeout)
                return _DeadlineStream(ssl_context.wrap_socket(self._sock, server_hostname=server_hostname),
                                       self._deadline)
            except BaseException:
                self._sock.close()
                raise

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return self._sock  # httpcore only asks it for selected_alpn_protocol()
        if info == "socket":
            return self._sock
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "client_addr":
            return self._sock.getsockname()
        return None


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects only to the addresses ``check_url`` resolved and checked, never resolving again."""

    def __init__(self, target: Target, deadline: float):
        self._target, self._deadline = target, deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.NetworkStream:
        if (host, port) != (self._target.host, self._target.port):  # a pool per fetch: cannot happen
            raise httpcore.ConnectError(f"refusing to connect to {host}:{port}, not the checked origin")
        error: Exception = httpcore.ConnectError("no address")
        for family, sockaddr in self._target.sockaddrs:  # all checked; try them in resolver order
            sock = socket.socket(family, socket.SOCK_STREAM)
            stream = _DeadlineStream(sock, self._deadline)
            try:
                with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
                    stream._arm(timeout, httpcore.ConnectTimeout)
                    for option in socket_options or ():
                        sock.setsockopt(*option)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.connect(sockaddr)
                return stream
            except httpcore.ConnectTimeout:
                sock.close()
                raise  # the deadline is gone for the other addresses too
            except httpcore.ConnectError as e:
                sock.close()
                error = e
        raise error
