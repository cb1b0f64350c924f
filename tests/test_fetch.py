"""lookalike.shared.fetch: SSRF refusals, malformed URLs, DNS pinning, statuses, size limit and the total deadline.

Safety rule of this file: before any URL is fed in, an autouse fixture makes connecting to
anything but loopback impossible (the attempt is recorded and refused, and the test fails),
and name resolution is faked, so no test sends traffic or DNS queries off this machine.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lookalike.shared import fetch
from lookalike.shared.errors import PoisonMessage, SourceUnavailable
from lookalike.shared.fetch import check_url, fetch_url, is_public

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
MAX = 100_000


def _is_loopback(host) -> bool:
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False  # a name: nothing here may connect by name
    return ip in ipaddress.ip_network("127.0.0.0/8") or ip == ipaddress.ip_address("::1")


@pytest.fixture(autouse=True)
def outside(monkeypatch):
    """Every connect to a non-loopback address is recorded and refused; the test fails if one happened."""
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(address):
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            attempts.append(address)
            raise ConnectionRefusedError(f"test guard: no connections outside loopback ({address})")

    def connect(self, address):
        guard(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        guard(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    assert attempts == [], f"connection attempts outside loopback: {attempts}"


class FakeDNS:
    """Names resolve from ``table`` (a list of addresses, or a function of the call number);
    IP literals are parsed locally (AI_NUMERICHOST); anything else does not exist."""

    def __init__(self, real_getaddrinfo):
        self.real = real_getaddrinfo
        self.table = {"localhost": ["127.0.0.1", "::1"]}
        self.calls: dict[str, int] = {}

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        host = host.removesuffix(".")  # absolute and relative spellings of a name, as a resolver does
        self.calls[host] = self.calls.get(host, 0) + 1
        if host not in self.table:
            try:
                return self.real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            except socket.gaierror:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
        addrs = self.table[host]
        if isinstance(addrs, BaseException):
            raise addrs
        if callable(addrs):
            addrs = addrs(self.calls[host])
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addrs
        ]


@pytest.fixture(autouse=True)
def dns(monkeypatch):
    fake = FakeDNS(socket.getaddrinfo)
    monkeypatch.setattr(fetch.socket, "getaddrinfo", fake)
    return fake


class Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def log_message(self, *args):
        pass

    def _answer(self, status, body=b"", length=None, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if length is not False:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes):
        try:
            for b in data:
                self.wfile.write(bytes([b]))
                time.sleep(0.2)
        except OSError:
            pass  # the client gave up, as it should

    def do_GET(self):
        Handler.hosts.append(self.headers["Host"])
        path = self.path.split("?")[0]
        if path == "/img.jpg":
            self._answer(200, IMAGE)
        elif path == "/missing":
            self._answer(404, b"not found")
        elif path == "/busy":
            self._answer(503, b"try later")
        elif path == "/slow-down":
            self._answer(429, b"too many")
        elif path == "/moved":
            self._answer(302, headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
        elif path == "/big-declared":
            self._answer(200, b"x" * 10, length=MAX + 1)
        elif path == "/big-undeclared":  # no Content-Length: HTTP/1.0 body runs until close
            self._answer(200, b"x" * (MAX + 1), length=False)
        elif path == "/trickle-body":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._trickle(b"x" * 1000)
        elif path == "/trickle-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self._trickle(b"X-Slow: " + b"y" * 1000)


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def server():
    """A plain HTTP server on 127.0.0.1; yields its port."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    _serve(srv)
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


REFUSED_ADDRESSES = [
    # IPv4: loopback, private, link-local (cloud metadata), CGNAT, this-network, multicast,
    # broadcast, reserved, documentation, benchmarking, IETF protocol assignments
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "100.127.255.254", "0.0.0.0", "0.1.2.3", "224.0.0.1",
    "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.51.100.7", "203.0.113.9",
    "198.18.0.1", "192.0.0.8",
    # IPv6: loopback, unspecified, link-local, ULA (incl. the EC2 metadata address), multicast,
    # site-local, documentation, discard
    "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1", "ff0e::1", "fec0::1",
    "2001:db8::1", "3fff::1", "100::1",
    # IPv6 forms that embed IPv4 (refused whatever they embed, even a public address):
    # mapped, compatible, NAT64 (well-known and local-use), 6to4, Teredo
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:8.8.8.8", "::127.0.0.1", "::8.8.8.8",
    "64:ff9b::a9fe:a9fe", "64:ff9b::808:808", "64:ff9b:1::a00:1", "2002:7f00:1::1", "2002:808:808::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
]


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_name_resolving_to_a_non_public_address_is_refused(address, dns, outside):
    # GIVEN a catalogue host whose name resolves to a non-public address
    dns.table["shop.test"] = [address]
    # WHEN its image is fetched
    with pytest.raises(PoisonMessage, match="resolves to non-public address") as err:
        fetch_url("http://shop.test/a.jpg", MAX, 1.0)
    # THEN it is refused as poison, naming the address, and nothing was connected to
    assert str(ipaddress.ip_address(address)) in str(err.value)
    assert outside == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://[::1]/", "http://[::127.0.0.1]/", "http://[::ffff:127.0.0.1]/",
    "http://[0:0:0:0:0:ffff:a9fe:a9fe]/", "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/", "http://2130706433/", "http://0x7f.1/", "http://127.1/",
    "http://0/", "http://localhost:8080/", "https://LOCALHOST./x",
])
def test_literal_and_odd_spellings_of_internal_addresses_are_refused(url, outside):
    # GIVEN a URL that spells an internal address directly (IP literal, integer, hex, short form)
    # WHEN it is fetched
    # THEN it is refused as poison and nothing was connected to
    with pytest.raises(PoisonMessage, match="resolves to non-public address"):
        fetch_url(url, MAX, 1.0)
    assert outside == []


def test_one_non_public_address_among_public_ones_refuses_the_url(dns):
    # GIVEN a name with a public and a private address
    dns.table["shop.test"] = ["93.184.215.14", "10.0.0.1"]
    # WHEN it is checked
    # THEN it is refused: every resolved address must be public
    with pytest.raises(PoisonMessage, match="10.0.0.1"):
        check_url("http://shop.test/a.jpg")


def test_public_addresses_pass_the_check_without_connecting(dns):
    # GIVEN names that resolve to public IPv4 and IPv6 addresses, one of them international
    dns.table["shop.test"] = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    dns.table["xn--bcher-kva.test"] = ["8.8.8.8"]
    # WHEN they are checked
    target = check_url("http://shop.test:8080/a b/ä.jpg?x=1".replace(" ", "%20"))
    idn = check_url("https://bücher.test/a.jpg")
    # THEN the target holds exactly the resolved addresses and an encoded request target
    assert [s[1][0] for s in target.sockaddrs] == ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    assert (target.host_header, target.target) == ("shop.test:8080", "/a%20b/%C3%A4.jpg?x=1")
    assert (idn.host, idn.port, idn.host_header) == ("xn--bcher-kva.test", 443, "xn--bcher-kva.test")
    assert is_public(ipaddress.ip_address("8.8.8.8")) and is_public(ipaddress.ip_address("2606:4700::1111"))


@pytest.mark.parametrize("url", [
    "http://shop.test:99999/a.jpg", "http://shop.test:abc/a.jpg", "http://shop.test:0/a.jpg", "http://[::1",
    "http://[v1.fe]/", "http://[fe80::1%25eth0]/", "http://[shop.test]/",
    "http://" + "a" * 64 + ".test/", "http://" + ".".join(["a" * 60] * 5) + "/",
    "http://sh\udcffop.test/", "http://\u2603" + "x" * 70 + ".test/",
    "http:///a.jpg", "http://:80/a.jpg", "http://shop..test/", "http://-shop.test/", "http://shop$.test/",
    "http://user:pw@shop.test/", "http://shop.test@evil.test/", "http://shop.test\\@evil.test/",
    "ftp://shop.test/a.jpg", "file:///etc/passwd", "gopher://shop.test/", "javascript:alert(1)",
    "//shop.test/a.jpg", "shop.test/a.jpg", "", "http://shop.test/" + "a" * 2048,
    "http://shop.test\n.evil.test/", "http://shop test/", "http://shop.test/a\tb.jpg",
])
def test_malformed_url_is_poison_before_any_lookup(url, dns, outside):
    # GIVEN a malformed URL
    dns.table["shop.test"] = ["93.184.215.14"]
    # WHEN it is fetched
    # THEN it is poison (never another exception), and neither DNS nor the network was touched
    with pytest.raises(PoisonMessage, match="refused URL"):
        fetch_url(url, MAX, 1.0)
    assert dns.calls == {} and outside == []


def test_unknown_host_is_poison_and_a_struggling_resolver_is_transient(dns):
    # GIVEN a name that does not exist and one whose lookup fails temporarily
    dns.table["flaky.test"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    # WHEN they are fetched
    # THEN the first is poison, the second may pass later
    with pytest.raises(PoisonMessage, match="does not resolve"):
        fetch_url("http://nowhere.test/a.jpg", MAX, 1.0)
    with pytest.raises(SourceUnavailable, match="cannot resolve"):
        fetch_url("http://flaky.test/a.jpg", MAX, 1.0)


def test_dns_rebinding_cannot_redirect_the_connection(server, dns, outside):
    # GIVEN a name that resolves to loopback once, then to a private address (a rebinding attack)
    dns.table["shop.test"] = lambda call: ["127.0.0.1"] if call == 1 else ["10.0.0.7"]
    Handler.hosts.clear()
    # WHEN its image is fetched (private addresses allowed, so the loopback answer passes the check)
    raw = fetch_url(f"http://shop.test:{server}/img.jpg", MAX, 2.0, allow_private=True)
    # THEN the bytes come from the checked address: one lookup, no connection anywhere else,
    # and the server saw the URL's host name
    assert raw == IMAGE
    assert dns.calls == {"shop.test": 1}
    assert outside == []
    assert Handler.hosts == [f"shop.test:{server}"]


def test_private_addresses_are_refused_unless_allowed(server):
    # GIVEN the loopback test server
    url = f"http://127.0.0.1:{server}/img.jpg"
    # WHEN it is fetched with and without allow_private
    # THEN only the trusted setting reaches it
    with pytest.raises(PoisonMessage, match="non-public"):
        fetch_url(url, MAX, 2.0)
    assert fetch_url(url, MAX, 2.0, allow_private=True) == IMAGE


@pytest.mark.parametrize("path, error, reason", [
    ("/missing", PoisonMessage, "answered 404"),
    ("/moved", PoisonMessage, "answered 302"),  # not followed: the Location is the metadata address
    ("/busy", SourceUnavailable, "answered 503"),
    ("/slow-down", SourceUnavailable, "answered 429"),
    ("/big-declared", PoisonMessage, f"larger than {MAX} bytes \\(Content-Length"),
    ("/big-undeclared", PoisonMessage, f"larger than {MAX} bytes$"),
])
def test_status_and_size_decide_poison_or_retry(server, path, error, reason, outside):
    # GIVEN a server answering with a given status or an oversized body
    # WHEN the URL is fetched
    # THEN the error says whether retrying can help, and why
    with pytest.raises(error, match=reason):
        fetch_url(f"http://127.0.0.1:{server}{path}", MAX, 2.0, allow_private=True)
    assert outside == []


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_trickling_server_is_cut_off_at_the_total_deadline(server, path):
    # GIVEN a server that sends one byte every 0.2 s forever (each read alone is quick)
    start = time.monotonic()
    # WHEN it is fetched with a 1 s budget
    with pytest.raises(SourceUnavailable, match="total deadline of 1 s"):
        fetch_url(f"http://127.0.0.1:{server}{path}", MAX, 1.0, allow_private=True)
    # THEN the whole download is cut off at about 1 s, not 1 s per read
    assert time.monotonic() - start < 2.5


def test_connection_refused_is_transient():
    # GIVEN a loopback port nobody listens on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # WHEN it is fetched
    # THEN the failure may pass: SourceUnavailable
    with pytest.raises(SourceUnavailable, match="ConnectError"):
        fetch_url(f"http://127.0.0.1:{port}/img.jpg", MAX, 1.0, allow_private=True)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for shop.test; yields
    (port, CA file, SNI names it saw)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not available to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=shop.test",
                    "-addext", "subjectAltName=DNS:shop.test"], check=True, capture_output=True)
    names = []
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sslobj, name, context: names.append(name)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    _serve(srv)
    yield srv.server_address[1], str(cert), names
    srv.shutdown()
    srv.server_close()


def test_tls_verifies_the_host_name_while_connecting_to_the_pinned_address(tls_server, dns, monkeypatch, outside):
    # GIVEN an HTTPS server on loopback whose certificate names shop.test, trusted by the fetcher,
    # and two names that resolve to it: the certified one and another
    port, ca, sni = tls_server
    monkeypatch.setattr(fetch, "_ssl_context", lambda: ssl.create_default_context(cafile=ca))
    dns.table["shop.test"] = dns.table["other.test"] = ["127.0.0.1"]
    # WHEN both are fetched
    raw = fetch_url(f"https://shop.test:{port}/img.jpg", MAX, 2.0, allow_private=True)
    with pytest.raises(SourceUnavailable, match="ConnectError"):
        fetch_url(f"https://other.test:{port}/img.jpg", MAX, 2.0, allow_private=True)
    # THEN the certified name works, the other fails verification: SNI and the certificate
    # check use the URL's name although the socket went to the checked IP
    assert raw == IMAGE
    assert sni[-2:] == ["shop.test", "other.test"]
    assert outside == []
