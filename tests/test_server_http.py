"""The reference backend's HTTP server under hostile and broken clients, over raw sockets.

Each test starts its own server (cheroot, through ``ReferenceServer``) with limits small
enough to reach, and drives it with sockets that send exactly what a bad client sends:
malformed framing, unknown methods, short bodies, dripped headers, idle floods, and a
process whose file descriptors run out.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ctrlupload.server import ReferenceServer, ServerConfig, ServerLimits
from tests.support.raw_client import presign_put, start_partial_put
from tests.support.serve_process import ServeProcess, child_env

MIB = 1024 * 1024


@contextlib.contextmanager
def _server(tmp_path: Path, **limits: float) -> Iterator[ReferenceServer]:
    config = ServerConfig(port=0, data_dir=tmp_path / "data", limits=ServerLimits(**limits))  # type: ignore[arg-type]
    with ReferenceServer(config) as server:
        yield server


def _connect(server: ReferenceServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=10)


def _exchange(server: ReferenceServer, raw: bytes, *, half_close: bool = True) -> bytes:
    """Send ``raw``, optionally half-close, and read until the server closes or 10 s pass."""
    with _connect(server) as conn:
        conn.sendall(raw)
        if half_close:
            # The server may have answered and closed already (a refused head): fine.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
        return _read_all(conn)


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def _healthz_within(server: ReferenceServer, seconds: float) -> bool:
    """Whether a fresh client gets /healthz answered within ``seconds``."""
    try:
        answer = requests.get(f"{server.base_url}/healthz", timeout=seconds)
    except requests.RequestException:
        return False
    return answer.status_code == 200


# -- framing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length",
    [b"\xc2\xb2", b"+5", b"5_0", b" 5x", b"-1", b"0x10", b"5, 6"],
    ids=["superscript-two", "plus", "underscore", "trailing-junk", "negative", "hex", "list"],
)
def test_a_content_length_that_is_not_plain_digits_gets_400_and_a_close(
    tmp_path: Path, length: bytes
) -> None:
    with _server(tmp_path) as server:
        answer = _exchange(
            server,
            b"POST /internal/storage/presign-put HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: " + length + b"\r\n\r\n{}",
        )
        assert _status(answer) == 400
        assert b"Content-Length" in answer
        # The server still serves everyone else.
        assert _healthz_within(server, 5)


def test_content_length_with_transfer_encoding_is_refused(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        answer = _exchange(
            server,
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        assert _status(answer) == 400


@pytest.mark.parametrize("method", [b"BREW", b"PROPFIND", b"TRACE", b"CONNECT"])
def test_an_unknown_method_gets_the_apps_json_answer_not_an_html_page(
    tmp_path: Path, method: bytes
) -> None:
    with _server(tmp_path) as server:
        answer = _exchange(server, method + b" /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(answer) == 405
        assert b"<html" not in answer.lower()
        head, _, body = answer.partition(b"\r\n\r\n")
        if method != b"CONNECT":  # cheroot answers CONNECT itself: no proxying here
            assert b"application/json" in head
            assert b'"method_not_allowed"' in body


def test_a_short_body_then_end_of_stream_gets_an_s3_style_answer(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        presign = presign_put(server.base_url, server.token, "a/short.mp4", "video/mp4", MIB)
        conn = start_partial_put(presign["upload_url"], presign["headers"], MIB, 1000)
        with conn:
            conn.shutdown(socket.SHUT_WR)  # the client ends its side: the body is short
            answer = _read_all(conn)
        assert _status(answer) == 400
        assert b"<Code>IncompleteBody</Code>" in answer
        assert not (tmp_path / "data" / "objects" / "a" / "short.mp4").exists()


def test_a_body_that_stalls_gets_an_answer_once_the_idle_timeout_passes(tmp_path: Path) -> None:
    with _server(tmp_path, idle_timeout_s=0.5) as server:
        presign = presign_put(server.base_url, server.token, "a/stall.mp4", "video/mp4", MIB)
        conn = start_partial_put(presign["upload_url"], presign["headers"], MIB, 1000)
        with conn:
            answer = _read_all(conn)  # no more bytes are sent; the server must give up
        assert _status(answer) == 400
        assert b"<Code>IncompleteBody</Code>" in answer
        assert list((tmp_path / "data" / "staging").glob("*.part")) == []


def test_oversized_headers_are_refused(tmp_path: Path) -> None:
    with _server(tmp_path, max_header_bytes=4096) as server:
        # Over the limit, but within one read of the server's 8 KiB buffer: the server
        # leaves nothing unread, so its close cannot turn into a reset that eats the 413.
        answer = _exchange(
            server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n"
        )
        assert _status(answer) in (413, 431)
        assert _healthz_within(server, 5)


# -- time and connection limits --------------------------------------------------------


def test_a_dripped_request_head_is_cut_off_at_the_header_timeout(tmp_path: Path) -> None:
    header_timeout_s = 1.0
    with _server(tmp_path, header_timeout_s=header_timeout_s, idle_timeout_s=30) as server:
        with _connect(server) as conn:
            started = time.monotonic()
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            # One header byte every 0.2 s: each read is well inside the 30 s idle timeout.
            closed = False
            for _ in range(100):
                try:
                    conn.sendall(b"X")
                except OSError:
                    closed = True
                    break
                readable, _, _ = _select_read(conn, 0.2)
                if readable:
                    closed = True
                    break
            took = time.monotonic() - started
            assert closed, "the server kept reading a head dripped for 20 s"
            answer = _read_all(conn)
        assert header_timeout_s <= took < header_timeout_s + 3
        assert answer == b"" or _status(answer) in (400, 408)
        assert _healthz_within(server, 5)


def _select_read(conn: socket.socket, timeout_s: float) -> tuple[list[socket.socket], list, list]:  # type: ignore[type-arg]
    import select

    return select.select([conn], [], [], timeout_s)


def test_idle_sockets_hold_no_worker_thread(tmp_path: Path) -> None:
    threads = 4
    with _server(tmp_path, threads=threads) as server:
        idle = [_connect(server) for _ in range(threads * 10)]
        try:
            # Every worker would be stuck on a silent socket if they held one each.
            assert _healthz_within(server, 1.0)
            presign = presign_put(server.base_url, server.token, "a/b.srt", "text/plain", 3)
            put = requests.put(presign["upload_url"], data=b"abc", headers=presign["headers"])
            assert put.status_code == 200
        finally:
            for conn in idle:
                conn.close()


def test_at_the_connection_cap_the_idlest_connection_makes_room(tmp_path: Path) -> None:
    cap = 20
    with _server(tmp_path, max_connections=cap, threads=4) as server:
        idle = []
        try:
            for _ in range(cap * 2):
                idle.append(_connect(server))
            assert _healthz_within(server, 1.0)
            # The oldest idle ones were closed by the server to admit the newer ones:
            # at most `cap` stay open, and the ones closed are the first opened.
            closed = _closed_by_server(idle, at_least=len(idle) - cap, within_s=5.0)
            assert len(closed) >= len(idle) - cap
            assert min(idle.index(conn) for conn in idle if conn not in closed) >= cap - 1
        finally:
            for conn in idle:
                conn.close()


def _closed_by_server(
    conns: list[socket.socket], *, at_least: int, within_s: float
) -> list[socket.socket]:
    """The connections the server has closed, once ``at_least`` are (or time is up)."""
    closed: list[socket.socket] = []
    deadline = time.monotonic() + within_s
    while len(closed) < at_least and (left := deadline - time.monotonic()) > 0:
        waiting = [conn for conn in conns if conn not in closed]
        readable, _, _ = _select_read_many(waiting, left)
        for conn in readable:
            try:
                ended = conn.recv(1) == b""
            except ConnectionResetError:
                ended = True
            if ended:
                closed.append(conn)
    return closed


def _select_read_many(
    conns: list[socket.socket], timeout_s: float
) -> tuple[list[socket.socket], list, list]:  # type: ignore[type-arg]
    import select

    return select.select(conns, [], [], timeout_s)


def test_serve_out_of_file_descriptors_still_admits_a_client_and_does_not_spin(
    tmp_path: Path,
) -> None:
    """250 idle sockets against a server allowed 256 descriptors (the reported case)."""
    limit = 256

    def lower_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    env = child_env(drop=["BACKEND_SERVICE_TOKEN"])
    with ServeProcess(
        tmp_path / "data",
        env=env,
        cwd=tmp_path,
        args=("--port", "0", "--threads", "8", "--no-access-log"),
        preexec_fn=lower_fd_limit,
    ) as serve:
        host, port = serve.base_url.removeprefix("http://").split(":")
        idle = []
        try:
            for _ in range(250):
                idle.append(socket.create_connection((host, int(port)), timeout=10))
            assert serve.process is not None
            cpu_before = _cpu_seconds(serve.process.pid)
            started = time.monotonic()
            answer = requests.get(f"{serve.base_url}/healthz", timeout=1.0)
            assert answer.status_code == 200
            time.sleep(2.0)  # measuring CPU use over an interval, not waiting for a result
            cpu_used = _cpu_seconds(serve.process.pid) - cpu_before
            elapsed = time.monotonic() - started
        finally:
            for conn in idle:
                conn.close()
        # A spinning accept loop burns a whole core: about `elapsed` CPU seconds.
        assert cpu_used < 0.5 * elapsed, (cpu_used, elapsed)
        assert serve.stop() == 0
    assert "Traceback" not in serve.stderr


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def test_the_access_log_has_one_line_per_request_and_no_query(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The level must outlive the server: a worker logs its request after the response's
    # last byte, and stop() waits for the workers; leaving the level first would drop
    # a line the client had already been answered for.
    with caplog.at_level("INFO", "ctrlupload.server.access"), _server(tmp_path) as server:
        presign = presign_put(server.base_url, server.token, "a/log.srt", "text/plain", 3)
        assert "signature=" in presign["upload_url"]
        put = requests.put(presign["upload_url"], data=b"abc", headers=presign["headers"])
        assert put.status_code == 200
        assert requests.get(f"{server.base_url}/nowhere?x=1").status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "ctrlupload.server.access"]
    assert len(lines) == 3, lines
    # One line each; in any order, since each worker logs once its answer is sent.
    for expected in (
        " POST /internal/storage/presign-put 200 in=",
        " PUT /upload/a/log.srt 200 in=3 out=0 ",
        " GET /nowhere 404 in=0 ",
    ):
        assert sum(expected in line for line in lines) == 1, (expected, lines)
    text = "\n".join(lines)
    assert "signature" not in text and "?" not in text and server.token not in text


def test_a_python_without_cheroot_gets_a_clear_message_from_serve(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "cheroot").mkdir()
    (blocker / "cheroot" / "__init__.py").write_text("raise ImportError('no cheroot here')\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "ctrlupload", "serve", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "pip install 'ctrlupload[server]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_program_that_never_stops_its_server_still_exits(tmp_path: Path) -> None:
    script = (
        "from ctrlupload.server import ReferenceServer, ServerConfig\n"
        f"server = ReferenceServer(ServerConfig(port=0, data_dir={str(tmp_path)!r})).start()\n"
        "import requests\n"
        "assert requests.get(server.base_url + '/healthz', timeout=5).status_code == 200\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
