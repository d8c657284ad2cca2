"""Bytes from local paths, tar members and any fsspec URL: deadlines, retries, a size cap.

Used by ``python -m data_tools.convert`` (through ``data_tools.hosts``, which adds per-host
limits and backoff); fetch one source by hand with ``python -m data_tools.fetch SOURCE``.

Whole http(s) objects go through urllib, not fsspec's HTTP filesystem (aiohttp is a dependency,
for shard URLs, manifests and input tables on web servers; this is a choice, not a gap): urllib's
blocking calls suit the fetch threads, its proxy and redirect handling come for free, a
Content-Length over --max-bytes is refused before the body is read, and the status code names
the failure ("http 404") and decides the retry. Two things urllib lacks are added here:

* a total deadline per attempt (``Deadline``): a socket timeout bounds each read, not the
  request, so a server that trickles a byte a second would hold a thread for ever. One clock
  thread per process shuts down the sockets of an attempt whose --timeout has passed, whatever
  it is blocked in (connect, headers, body).
* a per-process DNS cache (``RESOLVER``): one lookup per host name for the whole run (answers
  kept 5 minutes, failures 30 s), with the lookup itself held to the attempt's deadline.

Tar members over http (ranged reads) and other URLs (s3://, gs://, ...) go through fsspec with
the matching backend installed (their own timeouts apply). Every error is a ``FetchError`` whose
message starts with a short category ("missing", "http 404", "timeout", "dns failed", ...),
which the converter counts per shard; ``OptOut`` (a host's X-Robots-Tag or robots.txt said no)
becomes the row status ``opt-out``.
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import itertools
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from email.message import Message
from importlib import metadata
from typing import Any

from data_tools import polite

TOOL = "clipforge-data_tools"
PROJECT_URL = "https://github.com/clipforge"
DEFAULT_MAX_BYTES = 64 << 20  # no real photo is this large; a bigger answer is not an image
OPT_OUT_DIRECTIVES = polite.OPT_OUT_DIRECTIVES


def _version() -> str:
    try:
        return metadata.version("clipforge")
    except metadata.PackageNotFoundError:
        return "unknown"


def default_user_agent(contact: str | None = None) -> str:
    """``clipforge-data_tools/VERSION (+URL)``: who we are and where a site owner can write."""
    return f"{TOOL}/{_version()} (+{contact or PROJECT_URL})"


USER_AGENT = default_user_agent()


class FetchError(OSError):
    """A row's bytes could not be had; the message starts with a short failure category."""


class OptOut(FetchError):
    """The host asked not to be used for this (X-Robots-Tag or robots.txt): status opt-out."""


class HTTPStatusError(FetchError):
    """A non-2xx answer; ``retry_after`` is the seconds a 429/503 asked us to wait, if any."""

    def __init__(self, message: str, code: int, retry_after: float | None) -> None:
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0  # seconds per attempt, all of it: DNS, connect, headers and body
    retries: int = 2  # extra attempts for remote sources on errors that may pass
    max_bytes: int = DEFAULT_MAX_BYTES
    user_agent: str = USER_AGENT
    backoff: float = 0.5  # seconds before the first retry, doubled each time
    # X-Robots-Tag directives that turn a row away (status opt-out); () disables the check.
    disallowed_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES
    robots_txt: bool = False  # obey each image host's robots.txt (data_tools.hosts)
    host_connections: int = 8  # at most this many requests in flight per host, per process
    max_retry_after: float = 60.0  # a 429/503 asking for a longer wait fails the row instead

    @property
    def token(self) -> str:
        """The product token sites address us by, in robots.txt and scoped X-Robots-Tag."""
        return polite.product_token(self.user_agent)


def is_url(source: str) -> bool:
    return "://" in source


def is_http(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def resolve_source(source: str, base_dir: str) -> str:
    """Absolute path or URL for an input value; relative paths are taken against ``base_dir``."""
    if not source or is_url(source) or os.path.isabs(source) or not base_dir:
        return source
    if is_url(base_dir):
        return base_dir.rstrip("/") + "/" + source
    return os.path.join(base_dir, source)


class Clock:
    """One daemon thread per process that runs callbacks at monotonic times (cancellable)."""

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []
        self._wake = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def call_at(self, when: float, fn: Callable[[], None]) -> list[Any]:
        entry = [when, next(self._seq), fn]
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-clock", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:  # only a new earliest time changes the thread's wait
                self._wake.notify()
        return entry

    @staticmethod
    def cancel(entry: list[Any]) -> None:
        entry[2] = None  # left in the heap; dropped once it reaches the top

    def _run(self) -> None:
        # One wake-up per callback that runs: cancelled entries (every deadline of an attempt
        # that finished in time) are dropped as soon as they reach the top, never waited for.
        while True:
            with self._wake:
                while True:
                    while self._heap and self._heap[0][2] is None:
                        heapq.heappop(self._heap)
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        break
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._wake.wait(timeout)
                fn = heapq.heappop(self._heap)[2]
            if fn is not None:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - one bad callback must not stop the clock
                    print(f"warning: fetch clock callback failed: {e!r}", file=sys.stderr)


CLOCK = Clock()


class Deadline:
    """The end of one attempt: when it passes, every socket the attempt opened is shut down."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._entry: list[Any] | None = None

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0 or self.expired:
            raise TimeoutError(f"no complete answer within {self.seconds:g} s")
        return left

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                sock.close()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                # shutdown wakes a thread blocked in recv/connect on this socket; close may not.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Deadline:
        self._entry = CLOCK.call_at(self.at, self._expire)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._entry is not None:
            CLOCK.cancel(self._entry)


class Resolver:
    """getaddrinfo answers cached per process, keyed by host name; lookups bounded in time."""

    TTL, NEGATIVE_TTL, MAX_ENTRIES = 300.0, 30.0, 100_000

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, Any]] = {}
        self._pending: dict[str, Future[Any]] = {}
        self._lock = threading.RLock()  # a finished lookup runs _store at once, lock held
        # getaddrinfo cannot be interrupted: a stuck lookup blocks one of these, not a fetch.
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="dns")

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _store(self, host: str, future: Future[Any]) -> None:
        error = future.exception()
        ttl = self.NEGATIVE_TTL if error else self.TTL
        with self._lock:
            now = time.monotonic()
            if len(self._cache) > self.MAX_ENTRIES:  # a run meets millions of host names
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[host] = (now + ttl, error or future.result())
            self._pending.pop(host, None)

    def resolve(self, host: str, port: int, timeout: float) -> list[Any]:
        key = host.lower()
        with self._lock:
            hit = self._cache.get(key)
            if hit is None or hit[0] < time.monotonic():
                future = self._pending.get(key)
                if future is None:
                    future = self._pool.submit(socket.getaddrinfo, host, 0, 0, socket.SOCK_STREAM)
                    self._pending[key] = future
                    future.add_done_callback(lambda f: self._store(key, f))
                hit = None
        if hit is None:
            try:
                answer = future.result(timeout)
            except FutureTimeout:
                raise TimeoutError(f"DNS lookup of {host} took over {timeout:.1f} s") from None
        else:
            answer = hit[1]
        if isinstance(answer, BaseException):
            raise answer
        return [(*info[:4], (info[4][0], port, *info[4][2:])) for info in answer]


RESOLVER = Resolver()
_attempt = threading.local()  # the Deadline of the attempt this thread is making


def _open_socket(
    address: tuple[str, int], timeout: Any = None, source_address: Any = None
) -> socket.socket:
    """socket.create_connection through the DNS cache, registered with the attempt's deadline."""
    deadline: Deadline | None = getattr(_attempt, "deadline", None)
    if deadline is None:
        return socket.create_connection(address, timeout, source_address)
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in RESOLVER.resolve(host, port, deadline.remaining()):
        sock = socket.socket(family, kind, proto)
        try:
            deadline.watch(sock)
            sock.settimeout(min(timeout or deadline.seconds, deadline.remaining()))
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"no address for {host}")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _open_socket


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _open_socket

    def connect(self) -> None:
        super().connect()  # TLS with SNI around _open_socket's socket, which it detaches
        deadline: Deadline | None = getattr(_attempt, "deadline", None)
        if deadline is not None:
            deadline.watch(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req, context=self._context)


_OPENER = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)  # proxies, redirects as usual


def _too_large(size: int, opts: FetchOptions, source: str) -> FetchError:
    return FetchError(f"file too large: {source}: {size} bytes > --max-bytes {opts.max_bytes}")


def _read_capped(f: Any, opts: FetchOptions, source: str) -> bytes:
    data = f.read(opts.max_bytes + 1)
    if len(data) > opts.max_bytes:
        raise _too_large(len(data), opts, source)
    return data


def _read_body(response: Any, limit: int, deadline: Deadline, url: str) -> bytes:
    """Up to ``limit + 1`` bytes, block by block, so a trickle is seen against the deadline."""
    parts, size = [], 0
    while size <= limit:
        deadline.remaining()
        block = response.read1(min(1 << 16, limit + 1 - size))
        if not block:
            break
        parts.append(block)
        size += len(block)
    if deadline.expired:  # the clock shut the socket down: the end of a trickle, not of the body
        raise TimeoutError(f"no complete answer within {deadline.seconds:g} s")
    missing = getattr(response, "length", None)
    if size <= limit and missing:
        raise FetchError(f"fetch failed: {url}: connection closed {missing} bytes before the end")
    return b"".join(parts)


def opt_out_check(opts: FetchOptions, source: str) -> Callable[[Message], None]:
    def check(headers: Message) -> None:
        values = headers.get_all("X-Robots-Tag") or []
        hit = polite.x_robots_opt_out(values, opts.token, opts.disallowed_directives)
        if hit:
            raise OptOut(f"x-robots-tag: {source}: {hit}")

    return check


def http_get(
    url: str,
    opts: FetchOptions,
    check: Callable[[Message], None] | None = None,
    limit: int | None = None,
) -> bytes:
    """One attempt at ``url`` within --timeout in total; ``check`` sees the headers first.

    With ``limit`` the body is cut there (robots.txt) instead of refused when larger.
    """
    request = urllib.request.Request(url, headers={"User-Agent": opts.user_agent})
    with Deadline(opts.timeout) as deadline:
        _attempt.deadline = deadline
        try:
            with _OPENER.open(request, timeout=opts.timeout) as response:
                if check is not None:
                    check(response.headers)
                length = response.headers.get("Content-Length")
                if limit is None and length and length.isdigit() and int(length) > opts.max_bytes:
                    raise _too_large(int(length), opts, url)  # refused before reading the body
                data = _read_body(response, limit or opts.max_bytes, deadline, url)
            if limit is not None:
                return data[:limit]
            if len(data) > opts.max_bytes:
                raise _too_large(len(data), opts, url)
            return data
        except urllib.error.HTTPError as e:
            e.close()
            wait = polite.retry_after_seconds(e.headers.get("Retry-After")) if e.headers else None
            raise HTTPStatusError(f"http {e.code}: {url}: {e.reason}", e.code, wait) from e
        except FetchError:
            raise
        except (OSError, ValueError, http.client.HTTPException) as e:
            if deadline.expired or isinstance(e, TimeoutError | socket.timeout):
                raise FetchError(f"timeout: {url}: {e or 'no answer'}") from e
            reason = getattr(e, "reason", None)  # URLError wraps the socket's error
            if isinstance(reason, socket.gaierror):
                raise FetchError(f"dns failed: {url}: {reason}") from e
            if isinstance(reason, TimeoutError | socket.timeout):
                raise FetchError(f"timeout: {url}: {reason}") from e
            raise FetchError(f"fetch failed: {url}: {e}") from e
        finally:
            _attempt.deadline = None


def _local(path: str, opts: FetchOptions, member: tuple[int, int] | None) -> bytes:
    with open(path, "rb") as f:
        if member is not None:
            offset, size = member
            if size > opts.max_bytes:
                raise _too_large(size, opts, path)
            f.seek(offset)
            return f.read(size)
        return _read_capped(f, opts, path)


def _fsspec(source: str, opts: FetchOptions, member: tuple[int, int] | None) -> bytes:
    import fsspec  # local files and http never need it

    with fsspec.open(source, "rb") as f:
        if member is not None:
            f.seek(member[0])
            return f.read(member[1])
        return _read_capped(f, opts, source)


def fetch_once(source: str, opts: FetchOptions, member: tuple[int, int] | None = None) -> bytes:
    """One attempt, any kind of source; errors are ``FetchError`` or raw library errors."""
    if is_http(source) and member is None:
        return http_get(source, opts, opt_out_check(opts, source))
    if not is_url(source):
        return _local(source, opts, member)
    if source.startswith("file://"):
        return _local(source[len("file://") :], opts, member)
    return _fsspec(source, opts, member)


def as_fetch_error(error: Exception, source: str) -> tuple[FetchError, bool]:
    """(the error as a FetchError, worth another try)."""
    if isinstance(error, HTTPStatusError):
        # Client errors are final; overload (429) and server errors may pass.
        return error, error.code >= 500 or error.code == 429
    if isinstance(error, FetchError):
        category = str(error).split(":", 1)[0]
        return error, category in ("timeout", "fetch failed")
    if isinstance(error, FileNotFoundError | IsADirectoryError):
        return FetchError(f"missing: {source}: {error.strerror or error}"), False
    if isinstance(error, TimeoutError | socket.timeout):
        return FetchError(f"timeout: {source}: {error}"), True
    return FetchError(f"fetch failed: {source}: {error}"), True  # fsspec errors are OSError


def backoff_delay(opts: FetchOptions, attempt: int) -> float:
    # Jitter spreads retries of many threads so an overloaded host is not hit in lockstep.
    return opts.backoff * 2**attempt * (0.5 + random.random())


def fetch_bytes(
    source: str, opts: FetchOptions | None = None, member: tuple[int, int] | None = None
) -> bytes:
    """The whole object (or the tar member at ``member=(offset, size)``), on this thread.

    Remote sources are retried with exponential backoff and jitter (a 429/503's Retry-After
    when it gives one); local ones are not, since retrying cannot make a missing file appear.
    The converter goes through ``data_tools.hosts`` instead, which never sleeps on a thread.
    """
    opts = opts or FetchOptions()
    if not source:
        raise FetchError("empty source: the row has no image path or URL")
    remote = is_url(source) and not source.startswith("file://")
    attempts = 1 + (max(0, opts.retries) if remote else 0)
    for attempt in range(attempts):
        try:
            return fetch_once(source, opts, member)
        except (OSError, ValueError) as e:  # urllib, socket and fsspec errors are all OSError
            error, again = as_fetch_error(e, source)
            if not again or attempt + 1 == attempts:
                raise error from e
            wait = getattr(error, "retry_after", None)
            if wait is not None and wait > opts.max_retry_after:
                raise error from e
        time.sleep(backoff_delay(opts, attempt) if wait is None else wait)
    raise AssertionError("unreachable")


if __name__ == "__main__":
    print(f"{sys.argv[1]}: {len(fetch_bytes(sys.argv[1]))} bytes")
