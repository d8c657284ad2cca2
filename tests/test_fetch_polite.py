"""Polite fetching end to end: real loopback HTTP servers, real ``data_tools.convert`` runs.

    .venv/bin/python -m pytest tests/test_fetch_polite.py -q

Each server (http.server in a thread on 127.0.0.1, port 0: one "host" per port) serves real
COCO-mini JPEGs and records every request: path, User-Agent, arrival time, and how many requests
it was answering at once. The converter runs in this process (--processes 1), so the per-process
caches (DNS, robots.txt, host state) are the ones the test can count.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_tools import convert, fetch, hosts, polite, shards

Answer = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body


@dataclass
class Host:
    """One loopback web server; ``route(path, nth)`` answers the nth request for that path."""

    route: Callable[[str, int], Answer]
    delay: float = 0.0  # seconds each answer takes (to make overlapping requests visible)
    requests: list[tuple[float, str, str]] = field(default_factory=list)  # (time, path, agent)
    active: int = 0
    max_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with host.lock:
                    nth = sum(path == self.path for _, path, _ in host.requests)
                    host.requests.append((time.monotonic(), self.path, self.headers["User-Agent"]))
                    host.active += 1
                    host.max_active = max(host.max_active, host.active)
                time.sleep(host.delay)
                # Counted until the answer starts: the client cannot have begun its next
                # request before then, so overlaps seen here are real concurrent requests.
                with host.lock:
                    host.active -= 1
                code, headers, body = host.route(self.path, nth)
                self.send_response(code)
                for name, value in [*headers, ("Content-Length", str(len(body)))]:
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def paths(self, prefix: str = "") -> list[str]:
        return [p for _, p, _ in self.requests if p.startswith(prefix)]


@pytest.fixture
def jpegs(shared_data: Path) -> list[bytes]:
    return [
        p.read_bytes() for p in sorted((shared_data / "coco-mini" / "val2017").glob("*.jpg"))[:8]
    ]


@pytest.fixture
def serve() -> Iterator[Callable[..., Host]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(route: Callable[[str, int], Answer], delay: float = 0.0) -> Host:
        host = Host(route, delay)
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), host.handler())
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        host.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        return host

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def image_route(jpegs: list[bytes], extra: Callable[[str, int], Answer | None] | None = None):
    """/img/N.jpg -> a photo; anything ``extra`` does not answer is a 404."""

    def route(path: str, nth: int) -> Answer:
        answer = extra(path, nth) if extra else None
        if answer is not None:
            return answer
        if "/img/" in path:
            return 200, [("Content-Type", "image/jpeg")], jpegs[int(path.split("/")[-1][0]) % 8]
        return 404, [], b"not found"

    return route


def run(tmp: Path, urls: list[str], *flags: str, name: str = "out") -> tuple[dict, list[dict]]:
    """Convert ``urls`` in this process; (manifest, every row's report) in row order."""
    table = tmp / f"{name}.tsv"
    table.write_text("url\tcaption\n" + "".join(f"{u}\trow {i}\n" for i, u in enumerate(urls)))
    out = tmp / name
    argv = ["--input", str(table), "--output", str(out), "--image-size", "32", "--processes", "1"]
    argv += ["--no-progress", "--samples-per-shard", "1000", *flags]
    assert convert.main(argv) == 0
    manifest = shards.read_manifest(out)
    return manifest, [r for n in manifest["reports"] for r in pq.read_table(out / n).to_pylist()]


# X-Robots-Tag values (each list: the header's lines) -> turned away by the default set?
VARIANTS = [
    ([], False),
    (["noai"], True),
    (["NoImageAI"], True),  # names are case-insensitive
    (["noindex, nofollow"], True),
    (["none"], True),  # none = noindex, nofollow
    (["nofollow", "noimageindex"], True),  # a repeated header: every line counts
    (["otherbot: noai"], False),  # scoped to another crawler
    (["otherbot: noindex, nofollow"], False),  # the scope covers the whole line
    (["CLIPFORGE-DATA_TOOLS: noimageai"], True),  # scoped to us
    (["otherbot: noai", "nosnippet, noindex"], True),
    (["unavailable_after: 25 Jun 2099 15:00:00 PST, max-image-preview: large"], False),
]


def test_x_robots_tag_opt_outs_per_variant_flag_and_user_agent(
    serve: Callable[..., Host], jpegs: list[bytes], tmp_path: Path
) -> None:
    def tagged(path: str, nth: int) -> Answer | None:
        if path.startswith("/tag/"):
            lines = VARIANTS[int(path.split("/")[2])][0]
            return 200, [("X-Robots-Tag", v) for v in lines], jpegs[0]
        return None

    host = serve(image_route(jpegs, tagged))
    urls = [f"{host.url}/tag/{i}/img/0.jpg" for i in range(len(VARIANTS))]
    manifest, report = run(tmp_path, urls, name="default")
    for (lines, banned), row in zip(VARIANTS, report, strict=True):
        assert row["status"] == ("opt-out" if banned else "ok"), (lines, row)
        if banned:
            assert row["error"].startswith("x-robots-tag: "), row
    n_banned = sum(banned for _, banned in VARIANTS)
    assert (
        manifest["status"]["opt-out"] == n_banned
        and manifest["samples"] == len(VARIANTS) - n_banned
    )
    assert manifest["failure_reasons"] == {"x-robots-tag": n_banned}
    stats = json.loads((tmp_path / "default" / "00000_stats.json").read_text())
    assert stats["opt-out"] == n_banned and stats["failure_reasons"] == {"x-robots-tag": n_banned}
    agent = host.requests[0][2]
    assert agent.startswith(f"clipforge-data_tools/{convert.tool_version()} (+")

    # Another set: only noai; another crawler name: its scoped lines bind it, ours no longer.
    _, report = run(tmp_path, urls, "--disallowed-header-directives", "noai", "--user-agent",
                    "otherbot/2.0", name="noai")  # fmt: skip
    got = [r["status"] == "opt-out" for r in report]
    assert got == [False, True, False, False, False, False, True, False, False, True, False]
    assert host.requests[-1][2] == "otherbot/2.0"
    # Disabled, with a contact URL in the default user agent.
    contact = "https://example.org/crawler"
    _, report = run(tmp_path, urls, "--disallowed-header-directives", "none",
                    "--user-agent-contact", contact, name="off")  # fmt: skip
    assert all(r["status"] == "ok" for r in report)
    assert host.requests[-1][2] == f"clipforge-data_tools/{convert.tool_version()} (+{contact})"


ROBOTS = """# our group exists, so the '*' group does not bind us (RFC 9309)
User-agent: *
Disallow: /

User-Agent: otherbot
User-agent: CLIPFORGE-data_tools
Disallow: /img/
Allow: /img/1
Disallow: /*.png$
"""


def test_robots_txt_fetched_once_per_host_and_obeyed(
    serve: Callable[..., Host], jpegs: list[bytes], tmp_path: Path
) -> None:
    def with_robots(status: int, text: str) -> Callable[[str, int], Answer]:
        def robots(path: str, nth: int) -> Answer | None:
            return (status, [], text.encode()) if path == "/robots.txt" else None

        return image_route(jpegs, robots)

    rules, down, none = (
        serve(with_robots(200, ROBOTS)),
        serve(with_robots(503, "")),
        serve(with_robots(404, "")),
    )
    urls = []
    for i in range(12):  # interleaved hosts; the first rows of each arrive together
        urls += [f"{rules.url}/img/{i % 3}.jpg?r={i}", f"{down.url}/img/{i % 8}.jpg?r={i}"]
        urls += [f"{none.url}/img/{i % 8}.jpg?r={i}", f"{rules.url}/other/{i % 8}/img/0.jpg"]
    refused = "http://127.0.0.1:9/"  # nothing listens: no robots.txt answer at all
    urls += [f"{refused}img/{i}.jpg" for i in range(2)]
    flags = ("--robots-txt", "--threads", "8", "--retries", "0")
    manifest, report = run(tmp_path, urls, *flags, name="robots")
    assert [h.paths("/robots.txt") for h in (rules, down, none)] == [["/robots.txt"]] * 3
    by_url = {u: r for u, r in zip(urls, report, strict=True)}
    for url, row in by_url.items():
        if url.startswith(refused):
            assert row["status"] == "failed" and row["error"].startswith("fetch failed: "), row
            assert "robots.txt unreachable" in row["error"]
            continue
        if url.startswith(down.url):
            want = "opt-out"  # 5xx: "complete disallow"
        elif url.startswith(rules.url):
            want = "ok" if "/img/1.jpg" in url or "/other/" in url else "opt-out"
        else:
            want = "ok"  # 404: no rules
        assert row["status"] == want, (url, row)
        if want == "opt-out":
            assert row["error"].startswith("robots.txt: "), row
    assert not down.paths("/img/") and rules.paths("/img/") == [
        p for p in rules.paths("/img/") if p.startswith("/img/1")
    ]
    opted_out = manifest["status"]["opt-out"]
    assert manifest["failure_reasons"] == {"robots.txt": opted_out, "fetch failed": 2}
    # Without the flag nobody's robots.txt is asked for.
    _, report = run(tmp_path, urls[:8], name="plain")
    assert all(r["status"] == "ok" for r in report) and len(rules.paths("/robots.txt")) == 1
    ours = polite.parse_robots(ROBOTS, "clipforge-data_tools")
    assert not ours.allows("/x/y.png") and ours.allows("/x/y.png?s=1") and ours.allows("/img/1")


def test_per_host_cap_is_never_exceeded_and_dns_is_cached(
    serve: Callable[..., Host], jpegs: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = serve(image_route(jpegs), delay=0.05), serve(image_route(jpegs), delay=0.05)
    lookups: list[str] = []
    real = socket.getaddrinfo

    def counting(host, *args, **kwargs):  # noqa: ANN001, ANN202 - socket's signature
        lookups.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    fetch.RESOLVER.clear()
    by_name = [u.replace("127.0.0.1", "localhost") for u in (one.url, two.url)]
    urls = [f"{by_name[i % 2]}/img/{i % 8}.jpg?r={i}" for i in range(48)]
    _, report = run(tmp_path, urls, "--threads", "8", "--host-connections", "3", name="cap")
    assert all(r["status"] == "ok" for r in report)
    assert one.max_active == two.max_active == 3  # the cap, reached and never passed
    assert lookups.count("localhost") == 1  # one answer for both ports, the whole run


def test_429_and_503_retry_after_delay_only_that_host(
    serve: Callable[..., Host], jpegs: list[bytes], tmp_path: Path
) -> None:
    def busy(path: str, nth: int) -> Answer | None:
        if nth > 0:
            return None
        if path.startswith("/img/0"):  # every first try is turned away: Retry-After in seconds
            return 429, [("Retry-After", "1")], b"slow down"
        when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 2))
        return 503, [("Retry-After", when)], b"busy"  # ... or as an HTTP date (1-2 s away)

    slow, dated = serve(image_route(jpegs, busy)), serve(image_route(jpegs, busy))
    fast = serve(image_route(jpegs), delay=0.02)
    urls = [f"{slow.url}/img/0.jpg", f"{dated.url}/img/1.jpg"]
    urls += [f"{fast.url}/img/{i % 8}.jpg?r={i}" for i in range(30)]
    start = time.monotonic()
    _, report = run(tmp_path, urls, "--threads", "4", "--retries", "2", name="busy")
    assert all(r["status"] == "ok" for r in report), [r["error"] for r in report]
    first = slow.requests[0][0]
    for host in (slow, dated):  # asked again only once the wait it asked for ran out
        assert len(host.requests) == 2
        assert host.requests[1][0] >= host.requests[0][0] + 0.95
    # ... while the other host's rows were fetched meanwhile (16 rows fit the lookahead window).
    meanwhile = [t for t, _, _ in fast.requests if t < first + 0.95]
    assert len(meanwhile) >= 12
    assert time.monotonic() - start < 6


def test_one_burst_of_429s_without_retry_after_backs_off_once(
    serve: Callable[..., Host], jpegs: list[bytes]
) -> None:
    def busy(path: str, nth: int) -> Answer | None:
        return (429, [], b"slow down") if nth == 0 else None

    host = serve(image_route(jpegs, busy), delay=0.1)
    opts = fetch.FetchOptions(timeout=5, retries=1, backoff=0.2, host_connections=5)
    fetcher = hosts.Fetcher(opts, threads=5)
    try:
        start = time.monotonic()
        futures = [fetcher.submit(f"{host.url}/img/{i}.jpg") for i in range(5)]
        assert all(f.result(timeout=10) == jpegs[i] for i, f in enumerate(futures))
    finally:
        fetcher.close()
    # Five 429s of one burst are one overload: one backoff (0.1-0.3 s), not 0.2 x 2^4 x jitter.
    assert len(host.requests) == 10 and time.monotonic() - start < 1.2
    assert min(t for t, _, _ in host.requests[5:]) >= host.requests[4][0] + 0.1


def trickle_or_stuck(stop: threading.Event) -> tuple[str, str]:
    """Two raw servers: one sends a byte every 0.1 s (of the body, or of the headers for /t/1),
    one accepts and never answers."""
    trickle, stuck = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def drip(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            in_headers = b"/t/1" in conn.recv(65536)  # /t/1: the headers never end
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            if not in_headers:
                conn.sendall(b"Content-Length: 100000\r\n\r\n")
            end = time.monotonic() + 8  # a client without a deadline fails the test, not hangs
            while not stop.is_set() and time.monotonic() < end:
                conn.sendall(b"a" if in_headers else b"\xff")
                time.sleep(0.1)
        conn.close()

    def serve_trickle() -> None:
        trickle.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = trickle.accept()
                threading.Thread(target=drip, args=(conn,), daemon=True).start()

    def serve_stuck() -> None:
        stuck.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(stuck.accept()[0])  # kept open, never read or answered
        for conn in held:
            conn.close()

    for target in (serve_trickle, serve_stuck):
        threading.Thread(target=target, daemon=True).start()
    names = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in (trickle, stuck)]
    return names[0], names[1]


def test_trickling_and_stuck_hosts_are_bounded_by_the_deadline(
    serve: Callable[..., Host], jpegs: list[bytes], tmp_path: Path
) -> None:
    stop = threading.Event()
    try:
        trickle, stuck = trickle_or_stuck(stop)
        good = serve(image_route(jpegs))
        urls = [f"{trickle}/t/{i}.jpg" for i in range(2)] + [
            f"{stuck}/s/{i}.jpg" for i in range(16)
        ]
        urls += [f"{good.url}/img/{i % 8}.jpg?r={i}" for i in range(10)]
        flags = ("--timeout", "0.6", "--retries", "1", "--host-connections", "2", "--threads", "8")
        start = time.monotonic()
        _, report = run(tmp_path, urls, *flags, name="stuck")
        elapsed = time.monotonic() - start
    finally:
        stop.set()
    assert [r["status"] for r in report] == ["failed"] * 18 + ["ok"] * 10
    assert all(r["error"].startswith("timeout: ") for r in report[:18])
    # A trickle gets no longer than its deadline (not a socket timeout per byte: that never ends),
    # and the stuck host is skipped after 2 x cap timeouts in a row instead of 16 x 2 attempts.
    skipped = [r for r in report[2:18] if "skipped" in r["error"]]
    assert len(skipped) >= 8, [r["error"] for r in report[2:18]]
    assert elapsed < 5, elapsed


def test_header_and_retry_after_parsing_edge_cases() -> None:
    token, default = "clipforge-data_tools", polite.OPT_OUT_DIRECTIVES
    assert polite.x_robots_opt_out(["googlebot: nofollow, clipforge-data_tools: noai"], token,
                                   default) == "clipforge-data_tools: noai"  # fmt: skip
    assert polite.x_robots_opt_out(["noai"], token, ()) is None
    assert polite.retry_after_seconds("120") == 120
    assert polite.retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480) == 10
    assert polite.retry_after_seconds("soon") is None
    assert polite.product_token(fetch.default_user_agent("https://x.org")) == token


def test_clock_runs_a_new_earliest_callback_on_time_and_drops_cancelled_ones() -> None:
    """The clock thread is woken only by a callback due before everything it holds;
    cancelled entries (every deadline of an attempt that finished in time) never run and are
    dropped when they reach the top, not kept (and waited for) until they are due."""
    clock = fetch.Clock()
    ran: list[tuple[str, float]] = []
    done = threading.Event()
    start = time.monotonic()
    late = clock.call_at(start + 30, lambda: ran.append(("late", time.monotonic())))
    cancelled = [
        clock.call_at(start + 10 + i / 1000, lambda: ran.append(("x", 0.0))) for i in range(50)
    ]
    for entry in cancelled:
        clock.cancel(entry)
    time.sleep(0.2)  # the thread now waits for the 30 s entry
    clock.call_at(
        time.monotonic() + 0.05, lambda: (ran.append(("soon", time.monotonic())), done.set())
    )
    clock.call_at(time.monotonic() + 0.1, lambda: ran.append(("next", time.monotonic())))
    assert done.wait(5), "a callback due before the clock's earliest one ran late"
    time.sleep(0.3)
    clock.cancel(late)
    assert [name for name, _ in ran] == ["soon", "next"]
    assert ran[0][1] - start < 1.0
    # The cancelled ones were dropped long before they were due; the 30 s one is left.
    assert len(clock._heap) == 1
