"""The benchmark's throttling proxy: token bucket, HTTP metering, per-connection caps."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.support.servers import StorageSink
from tests.support.throttle_proxy import (
    CountingSink,
    HttpRequestMeter,
    ThrottleProxy,
    ThrottleProxyProcess,
    TokenBucket,
)

MIB = 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_grants_the_burst_then_meters_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1000, burst=500, clock=clock)
    assert bucket.take(500) == 0.0
    assert bucket.take(100) == pytest.approx(0.1)  # 100 bytes of debt at 1000/s
    clock.now += 0.1
    assert bucket.take(0) == pytest.approx(0.0, abs=1e-9)  # debt paid back, nothing more
    clock.now += 10  # refills to the burst only, not to 10,000
    assert bucket.take(600) == pytest.approx(0.1)


def test_token_bucket_long_run_rate_is_exact_whatever_the_read_sizes() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=20 * MIB, burst=256 * 1024, clock=clock)
    sent = 0
    for index in range(5000):
        amount = 1 + (index * 7919) % (64 * 1024)
        clock.now += bucket.take(amount)  # wait as told, then send
        sent += amount
    elapsed = clock.now - 100.0
    assert (sent - 256 * 1024) / elapsed == pytest.approx(20 * MIB, rel=1e-6)


def _request(body: bytes, target: str = "/upload/a?partNumber=1") -> bytes:
    head = f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_meter_splits_keep_alive_requests_at_any_read_boundary(step: int) -> None:
    bodies = [os.urandom(10_000), b"", b"\r\n\r\nPUT / HTTP/1.1\r\n\r\n" * 50]
    stream = b"".join(_request(body, f"/p/{i}") for i, body in enumerate(bodies))
    meter = HttpRequestMeter()
    for at in range(0, len(stream), step):
        meter.feed(stream[at : at + step])
    assert [r.target for r in meter.requests] == ["/p/0", "/p/1", "/p/2"]
    assert [r.body_bytes for r in meter.requests] == [len(b) for b in bodies]
    assert all(r.complete for r in meter.requests)
    assert meter.body_bytes == sum(map(len, bodies))
    assert meter.head_bytes + meter.body_bytes == len(stream)
    assert meter.unparsed_bytes == 0


def test_meter_counts_a_cut_off_body_as_incomplete() -> None:
    meter = HttpRequestMeter()
    meter.feed(_request(b"x" * 1000)[:-400])
    (record,) = meter.requests
    assert (record.content_length, record.body_bytes, record.complete) == (1000, 600, False)
    assert record.finished_s is None
    meter.feed(b"x" * 400)
    assert record.complete
    assert record.finished_s is not None


def test_meter_gives_up_on_chunked_bodies() -> None:
    meter = HttpRequestMeter()
    stream = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    meter.feed(stream)
    assert meter.requests == []
    assert meter.unparsed_bytes == len(stream)


@pytest.fixture
def counting_sink() -> Iterator[CountingSink]:
    sink = CountingSink()
    yield sink
    sink.close()


def _send(port: int, size: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(bytes(size))
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # until the proxy closes after the sink did


def test_proxy_caps_each_connection_and_counts_every_byte(counting_sink: CountingSink) -> None:
    rate, size, burst = 8 * MIB, 3 * MIB, 256 * 1024
    with ThrottleProxy(
        "127.0.0.1", counting_sink.port, rate_bytes_per_s=rate, burst_bytes=burst
    ) as proxy:
        started = time.perf_counter()
        _send(proxy.port, size)
        single_s = time.perf_counter() - started

        # Four at once: each has its own bucket, so together they take about as long as
        # one did; a shared bucket would take four times as long.
        threads = [threading.Thread(target=_send, args=(proxy.port, size)) for _ in range(4)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        parallel_s = time.perf_counter() - started
        counting_sink.join()
        stats = proxy.stats()

    floor_s = (size - burst) / rate
    assert single_s >= floor_s * 0.95
    assert parallel_s >= floor_s * 0.95
    assert parallel_s < 4 * floor_s * 0.75
    assert counting_sink.received == [size] * 5
    assert stats.bytes_up == 5 * size
    assert [c.bytes_up for c in stats.connections] == [size] * 5
    assert stats.connections_total == 5
    assert stats.connections_open == 0


def test_proxy_wait_idle_waits_for_connections_the_client_left_first() -> None:
    with (
        StorageSink() as sink,
        ThrottleProxy(
            "127.0.0.1", int(sink.base_url.rsplit(":", 1)[1]), rate_bytes_per_s=None
        ) as proxy,
    ):
        held = socket.create_connection(("127.0.0.1", proxy.port))
        try:
            request = _request(b"abc", "/bucket/k")
            held.sendall(request)
            # The answer means the proxy holds the connection (kept alive: still open).
            assert held.recv(65536).startswith(b"HTTP/1.1 200 ")
            assert not proxy.wait_idle(0.2)  # a timeout, not a hang
        finally:
            held.close()  # without waiting for the proxy to close its side
        assert proxy.wait_idle(10)
        stats = proxy.stats()
    assert (stats.connections_total, stats.connections_open) == (1, 0)
    assert stats.connections[0].closed_s is not None
    assert stats.bytes_up == len(request)
    assert stats.body_bytes == 3


def test_proxy_counts_http_bodies_of_real_puts() -> None:
    bodies = [os.urandom(300_000), os.urandom(5), b""]
    with (
        StorageSink() as sink,
        ThrottleProxy(
            "127.0.0.1", int(sink.base_url.rsplit(":", 1)[1]), rate_bytes_per_s=None
        ) as proxy,
        requests.Session() as session,
    ):
        for index, body in enumerate(bodies):
            response = session.put(f"{proxy.url}/bucket/k{index}", data=body, timeout=10)
            assert response.status_code == 200
        stats = proxy.stats()
        proxy.reset()
        after_reset = proxy.stats()
    assert stats.connections_total == 1  # keep-alive went through the proxy
    assert stats.requests == 3
    assert stats.body_bytes == sum(map(len, bodies))
    assert stats.head_bytes + stats.body_bytes == stats.bytes_up
    assert stats.unparsed_bytes == 0
    assert [r.target for r in stats.connections[0].requests] == [
        "/bucket/k0",
        "/bucket/k1",
        "/bucket/k2",
    ]
    assert after_reset.bytes_up == after_reset.requests == 0
    # Numbers stay unique across a reset: the kept-alive connection is still number 1.
    assert [c.number for c in after_reset.connections] == [1]


def test_proxy_in_a_child_process(counting_sink: CountingSink) -> None:
    with ThrottleProxyProcess("127.0.0.1", counting_sink.port, rate_bytes_per_s=None) as proxy:
        _send(proxy.port, 2 * MIB)
        assert proxy.wait_idle(10)
        stats = proxy.stats()
        proxy.reset()
        assert proxy.stats()["bytes_up"] == 0
    assert stats["bytes_up"] == 2 * MIB
    assert stats["connections"][0]["bytes_up"] == 2 * MIB
