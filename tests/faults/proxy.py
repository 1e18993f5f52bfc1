"""A fault-injecting HTTP proxy on 127.0.0.1, placed between boto3 (endpoint_url = the proxy) and the S3 server.

Each request is matched against a script of rules; a matching rule injects its fault, otherwise the request is
forwarded unchanged. Faults are the ones object storage really shows: a connection reset before the request reaches
the server or after the server acted on it (the client cannot tell which), a reset in the middle of the response
body, 500/503 errors, SlowDown throttling, slow responses, and bytes changed in transit.

    with FaultProxy(upstream) as proxy:
        proxy.add(Fault.DROP_RESPONSE, every=5)                           # intermittent
        proxy.add(Fault.HTTP_503, method="PUT", match="partNumber=", times=2)  # the first two part uploads
        proxy.add(Fault.HTTP_500)                                         # persistent: every request
        ... boto3 with endpoint_url=proxy.url ...
        proxy.injected  # Counter of the faults actually injected

Written for the tests (a few dozen lines of http.server) rather than taken from PyPI: the proxies there are either
whole MITM frameworks (mitmproxy) or need an external binary (toxiproxy), and neither injects S3-shaped errors.
"""

from __future__ import annotations

import enum
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class Fault(enum.Enum):
    DROP_REQUEST = "drop_request"  # reset before forwarding: the server never sees the request
    DROP_RESPONSE = "drop_response"  # forwarded and acted on; the connection is reset before any response byte
    DROP_MID_BODY = "drop_mid_body"  # status, headers and half the body, then a reset
    HTTP_500 = "http_500"
    HTTP_503 = "http_503"
    SLOW_DOWN = "slow_down"  # S3's throttling answer: 503 with error code SlowDown
    DELAY = "delay"  # forwarded, answered after `seconds`
    CORRUPT_RESPONSE = "corrupt_response"  # one byte of the response body flipped
    CORRUPT_REQUEST = "corrupt_request"  # one byte of the request body flipped before forwarding


_ERRORS = {
    Fault.HTTP_500: (500, "InternalError", "We encountered an internal error. Please try again."),
    Fault.HTTP_503: (503, "ServiceUnavailable", "Please reduce your request rate."),
    Fault.SLOW_DOWN: (503, "SlowDown", "Please reduce your request rate."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass
class Rule:
    fault: Fault
    method: str | None = None  # GET, PUT, POST, HEAD, DELETE; None matches any
    match: str | None = None  # substring of the request target (path and query); None matches any
    times: int | None = None  # inject on the first `times` matches only; None: no limit
    every: int = 1  # inject on every `every`-th match (1: on each)
    seconds: float = 0.0  # for DELAY
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and (self.match is None or self.match in target)


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.rules: list[Rule] = []
        self.injected: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.history: list[tuple[str, str, str | None]] = []  # method, target, the fault injected or None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, fault: Fault, **conditions) -> Rule:
        rule = Rule(fault, **conditions)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def pick(self, method: str, target: str) -> Rule | None:
        """The first rule whose turn it is; every matching rule counts the request."""
        chosen = None
        with self._lock:
            self.requests.append((method, target))
            for rule in self.rules:
                if not rule.matches(method, target):
                    continue
                rule.seen += 1
                due = rule.seen % rule.every == 0 and (rule.times is None or rule.fired < rule.times)
                if due and chosen is None:
                    rule.fired += 1
                    self.injected[rule.fault.value] += 1
                    chosen = rule
            self.history.append((method, target, chosen.fault.value if chosen else None))
        return chosen


def _handler_for(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and http.server answers `Expect: 100-continue` itself

        def log_message(self, *_args) -> None:
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            # SO_LINGER 0: close with RST, as a dropped connection looks to the client.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                return response.status, response.getheaders(), response.read()
            finally:
                upstream.close()

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, cut: bool = False) -> None:
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and not (name.lower() == "content-length" and self.command != "HEAD"):
                    self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self._reset()
                return
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            body = self._read_body()
            rule = proxy.pick(self.command, self.path)
            fault = rule.fault if rule else None
            if fault is Fault.DROP_REQUEST:
                return self._reset()
            if fault in _ERRORS:
                status, code, message = _ERRORS[fault]
                xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
                return self._answer(status, [("Content-Type", "application/xml")], xml.encode())
            if fault is Fault.CORRUPT_REQUEST and body:
                body = _flip(body)
            status, headers, response = self._forward(body)
            if fault is Fault.DROP_RESPONSE or (fault is Fault.DROP_MID_BODY and len(response) < 2):
                return self._reset()
            if fault is Fault.DELAY:
                time.sleep(rule.seconds)
            if fault is Fault.CORRUPT_RESPONSE and response:
                response = _flip(response)
            self._answer(status, headers, response, cut=fault is Fault.DROP_MID_BODY)

        def _handle_quietly(self) -> None:
            try:
                self._handle()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up first (its read timeout): as a real server sees it

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle_quietly

    return Handler


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
