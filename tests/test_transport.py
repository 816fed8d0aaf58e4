"""The transport over real loopback sockets: one retry owner, bounded attempts.

Each fault server answers the first attempts badly and then well, or badly forever;
the transport must retry mid-body failures like failures before the headers, count
its attempts, bound every attempt, and keep connections alive when answers are whole.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ctrlupload import TransportFailure
from ctrlupload._transport import MAX_RESPONSE_BYTES, RetryPolicy, Transport, TransportConfig
from tests.support.servers import RawSocketServer, _abort, _read_request_head

OK_BODY = b'{"status": "ok"}'


def _answer(conn: socket.socket, body: bytes = OK_BODY, status: str = "200 OK") -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    conn.sendall(head + body)


def _read_body(conn: socket.socket, head: bytes) -> None:
    """Read the rest of the request body announced in ``head``."""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    got = len(head.split(b"\r\n\r\n", 1)[1])
    while got < length:
        block = conn.recv(65536)
        if not block:
            return
        got += len(block)


class Scripted:
    """A raw handler that plays ``faults[n]`` on the n-th request, then answers 200."""

    def __init__(self, *faults: Callable[[socket.socket], None]) -> None:
        self._faults = list(faults)
        self._lock = threading.Lock()
        self.requests = 0

    def __call__(self, conn: socket.socket) -> None:
        while True:
            head = _read_request_head(conn)
            if not head:
                return
            _read_body(conn, head)
            with self._lock:
                index = self.requests
                self.requests += 1
            if index < len(self._faults):
                self._faults[index](conn)
                return
            _answer(conn)


def cut_mid_body_with_reset(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    _abort(conn)


def cut_mid_body_with_fin(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)


def stall_mid_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    conn.recv(1)  # until the client gives up and closes


def trickle_forever(conn: socket.socket) -> None:
    """A byte of a never-ending header every 50 ms: no read ever times out."""
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    try:
        while True:
            conn.sendall(b"X")
            time.sleep(0.05)
    except OSError:
        return


def config(**overrides: object) -> TransportConfig:
    values: dict[str, object] = {
        "connect_timeout_s": 1.0,
        "read_timeout_s": 0.5,
        "retry": RetryPolicy(attempts=3, backoff_s=0.01, backoff_max_s=0.1),
    }
    values.update(overrides)
    return TransportConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def transport() -> Iterator[Transport]:
    made = Transport(config(), user_agent="test")
    yield made
    made.close()


@pytest.mark.parametrize(
    "fault", [cut_mid_body_with_reset, cut_mid_body_with_fin, stall_mid_body], ids=str
)
def test_a_failure_mid_answer_body_is_retried_like_one_before_the_headers(
    transport: Transport, fault: Callable[[socket.socket], None]
) -> None:
    handler = Scripted(fault)
    with RawSocketServer(handler) as server:
        result = transport.post_json(server.base_url + "/x", {"a": 1}, token="t0k3n-secret")
    assert result.status_code == 200
    assert result.body == OK_BODY
    assert result.attempts == 2
    assert handler.requests == 2


def test_mid_body_failures_share_the_attempt_budget_and_say_how_many(
    transport: Transport,
) -> None:
    handler = Scripted(cut_mid_body_with_reset, cut_mid_body_with_fin, stall_mid_body)
    with RawSocketServer(handler) as server, pytest.raises(TransportFailure) as caught:
        transport.put(server.base_url + "/obj?X-Amz-Signature=s3cr3t", b"body", {})
    assert handler.requests == 3  # the budget is 3 attempts, whatever failed
    assert "after 3 attempts" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_a_put_body_is_resent_whole_after_a_mid_answer_failure(transport: Transport) -> None:
    bodies: list[bytes] = []

    def recording(conn: socket.socket) -> None:
        head = _read_request_head(conn)
        rest = head.split(b"\r\n\r\n", 1)[1]
        while len(rest) < 5:
            rest += conn.recv(5)
        bodies.append(rest)
        if len(bodies) == 1:
            cut_mid_body_with_reset(conn)
        else:
            _answer(conn, b"")

    with RawSocketServer(recording) as server:
        result = transport.put(server.base_url + "/obj", b"hello", {})
    assert result.ok and result.attempts == 2
    assert bodies == [b"hello", b"hello"]


def test_a_trickling_server_cannot_hold_an_attempt_past_its_bound() -> None:
    cfg = config(connect_timeout_s=0.2, read_timeout_s=0.3)
    transport = Transport(cfg, user_agent="test")
    failures: list[BaseException] = []

    def call(url: str) -> None:
        try:
            transport.post_json(url, {}, token="t0k3n-secret")
        except BaseException as exc:
            failures.append(exc)

    try:
        with RawSocketServer(trickle_forever) as server:
            worker = threading.Thread(target=call, args=(server.base_url + "/x",))
            worker.start()
            # A liveness guard, not a timing check: without the bound the call trickles
            # on until the server stops, so stopping it is what would end the wait.
            worker.join(60)
            held_forever = worker.is_alive()
        worker.join(10)
    finally:
        transport.close()
    assert not held_forever, "the trickling server held the call past every bound"
    assert len(failures) == 1 and isinstance(failures[0], TransportFailure)
    message = str(failures[0])
    assert "did not finish within its" in message
    assert "after 3 attempts" in message
    # Every attempt was cut at its bound: one connection per attempt.
    assert server.connections_opened == 3


def test_attempt_bound_grows_with_the_body_at_the_minimum_send_rate() -> None:
    cfg = TransportConfig(
        connect_timeout_s=10, read_timeout_s=120, min_send_rate_bytes_s=1024 * 1024
    )
    assert cfg.attempt_bound_s(0) == 130
    assert cfg.attempt_bound_s(64 * 1024 * 1024) == 130 + 64


def test_whole_answers_keep_the_connection_alive(transport: Transport) -> None:
    with RawSocketServer(Scripted()) as server:
        for _ in range(5):
            assert transport.post_json(server.base_url + "/x", {}, token="t0k3n").ok
        assert server.connections_opened == 1


def test_an_oversized_answer_is_cut_and_its_connection_dropped(transport: Transport) -> None:
    big = b"y" * (MAX_RESPONSE_BYTES + 4096)

    served: list[int] = []

    def answer_big_then_small(conn: socket.socket) -> None:
        while _read_request_head(conn):
            # Counted before answering: the client drops the big answer mid-send, and
            # _answer then raises (reset), which would skip a count made after it.
            first = not served
            served.append(1)
            _answer(conn, big if first else OK_BODY)

    with RawSocketServer(answer_big_then_small) as server:
        first = transport.post_json(server.base_url + "/x", {}, token="t0k3n")
        second = transport.post_json(server.base_url + "/x", {}, token="t0k3n")
        assert server.connections_opened == 2
    assert first.body == big[:MAX_RESPONSE_BYTES]
    assert second.body == OK_BODY


def test_retried_statuses_say_how_many_attempts_they_took(transport: Transport) -> None:
    def always_503(conn: socket.socket) -> None:
        while _read_request_head(conn):
            _answer(conn, b"{}", "503 Service Unavailable")

    with RawSocketServer(always_503) as server:
        result = transport.post_json(server.base_url + "/x", {}, token="t0k3n")
    assert result.status_code == 503
    assert result.attempts == 3


def test_a_compressed_answer_is_not_requested(transport: Transport) -> None:
    heads: list[bytes] = []

    def recording(conn: socket.socket) -> None:
        heads.append(_read_request_head(conn))
        _answer(conn)

    with RawSocketServer(recording) as server:
        transport.post_json(server.base_url + "/x", {}, token="t0k3n")
    assert b"accept-encoding: identity" in heads[0].lower()


# -- send: any method, exact bytes, one attempt when the policy says so ------------------


class Recording:
    """A raw handler that keeps each request's head and body, then plays ``answer``."""

    def __init__(self, answer: Callable[[socket.socket], None] = _answer) -> None:
        self._answer = answer
        self.requests: list[tuple[bytes, bytes]] = []

    def __call__(self, conn: socket.socket) -> None:
        while True:
            head = _read_request_head(conn)
            if not head:
                return
            head, _, body = head.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            while len(body) < length:
                block = conn.recv(65536)
                if not block:
                    return
                body += block
            self.requests.append((head.lower(), body))
            self._answer(conn)


def _once() -> Transport:
    return Transport(config(retry=RetryPolicy(attempts=1)), user_agent="test")


@pytest.mark.parametrize(
    ("method", "body"),
    [("PUT", b""), ("GET", b""), ("POST", b'{"object_key": "conformance/'), ("DELETE", b"x")],
)
def test_send_sends_the_exact_bytes_with_their_content_length_never_chunked(
    transport: Transport, method: str, body: bytes
) -> None:
    handler = Recording()
    with RawSocketServer(handler) as server:
        result = transport.send(
            method,
            server.base_url + "/x",
            body=body,
            # A stale length or a chunked framing from the caller must not go out.
            headers={"content-length": "999", "Transfer-Encoding": "chunked", "X-A": "b"},
        )
    assert result.ok
    [(head, sent)] = handler.requests
    assert head.startswith(method.lower().encode() + b" /x http/1.1")
    assert sent == body
    assert f"\r\ncontent-length: {len(body)}".encode() in head
    assert head.count(b"content-length:") == 1
    assert b"transfer-encoding" not in head
    assert b"\r\nx-a: b" in head


def test_send_with_no_retries_answers_a_5xx_after_one_attempt() -> None:
    def always_503(conn: socket.socket) -> None:
        _answer(conn, b"{}", "503 Service Unavailable")

    handler = Recording(always_503)
    transport = _once()
    try:
        with RawSocketServer(handler) as server:
            result = transport.send("POST", server.base_url + "/x", body=b"{}", headers={})
    finally:
        transport.close()
    assert result.status_code == 503
    assert result.attempts == 1
    assert len(handler.requests) == 1


def test_send_with_no_retries_fails_after_one_attempt_cut_mid_answer() -> None:
    handler = Scripted(cut_mid_body_with_reset)
    transport = _once()
    try:
        with RawSocketServer(handler) as server, pytest.raises(TransportFailure) as caught:
            transport.send("GET", server.base_url + "/x?signature=s3cr3t", body=None, headers={})
    finally:
        transport.close()
    assert handler.requests == 1
    assert "attempts" not in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_send_does_not_follow_a_redirect(transport: Transport) -> None:
    def redirect(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"
        )

    handler = Recording(redirect)
    with RawSocketServer(handler) as server:
        result = transport.send("PUT", server.base_url + "/x", body=b"abc", headers={})
    assert result.status_code == 307
    assert result.headers["location"] == "/elsewhere"
    assert [head.split(b"\r\n", 1)[0] for head, _ in handler.requests] == [b"put /x http/1.1"]
