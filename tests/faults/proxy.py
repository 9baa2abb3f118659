"""A real TCP proxy in front of the MLflow server that injects faults per request path: answer 503 without
forwarding, forward and then drop the connection before the answer (the server acted, the client never hears), or
drop the connection before forwarding. quantgate and MLflow's client talk to it over real sockets; nothing in either
is patched.

One request per connection: the proxy asks the server to close after answering (``Connection: close``), so every
request is seen, and judged, on its own.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class Rule:
    path: str  # a substring of the request line's path
    action: str  # "fail" (503, not forwarded), "drop_after" (forwarded, answer dropped), "drop" (not forwarded)
    times: int = 1_000_000  # how many matching requests it applies to
    method: str = ""  # only requests with this method ("" = any)
    hits: int = 0


@dataclass
class FaultProxy:
    upstream_port: int
    rules: list[Rule] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, *rules: Rule) -> None:
        with self._lock:
            self.rules = list(rules)

    def close(self) -> None:
        self._stop = True
        self._server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _action(self, method: str, path: str) -> str:
        with self._lock:
            self.seen.append(f"{method} {path}")
            for rule in self.rules:
                if rule.path in path and rule.method in ("", method) and rule.hits < rule.times:
                    rule.hits += 1
                    return rule.action
        return "forward"

    def _serve(self, client: socket.socket) -> None:
        with client:
            try:
                head, body = _read_request(client)
            except (OSError, ValueError):
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, _, rest = request_line.partition(" ")
            action = self._action(method, rest.partition(" ")[0])
            if action == "drop":
                _reset(client)
                return
            if action == "fail":
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            try:
                answer = _forward(self.upstream_port, _close_after(head), body)
            except OSError:
                _reset(client)
                return
            if action == "drop_after":
                _reset(client)
                return
            client.sendall(answer)


def _read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("closed before the request head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head, rest


def _close_after(head: bytes) -> bytes:
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _forward(port: int, head: bytes, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as upstream:
        upstream.sendall(head + body)
        answer = b""
        while chunk := upstream.recv(65536):
            answer += chunk
    return answer


def _reset(conn: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the client sees the connection reset, as with a crashed server."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
