"""The fetch threads of one converter process, polite per host: caps, backoff, robots.txt.

Used by ``data_tools.chunks`` (``Fetcher.submit`` returns a future per row); nothing to run on
its own. A host is a URL's name and port. Everything here is per process: with --processes P a
host sees at most P x --host-connections requests at once, and its robots.txt is fetched at
most once by each process (kept for the whole run).

Why a scheduler and not one blocking call per thread: a thread that sleeps through a host's
Retry-After, or waits for a free slot of a busy host, is a thread the other hosts lose. Here
no fetch thread ever waits on a host: a row whose host is at its cap, or backing off, stays
in that host's queue and the threads take other hosts' rows meanwhile; one clock thread
(``fetch.CLOCK``) releases it when the wait is over.

* cap: at most ``host_connections`` attempts in flight per host.
* 429/503: the whole host waits for Retry-After (seconds or an HTTP date) or, without one, for
  an exponential backoff with jitter that grows with each overload answer in a row; the row
  is retried (up to --retries). A wait over --max-retry-after fails the host's rows at once.
* stuck hosts: each attempt has a total deadline (``fetch.Deadline``); after 2 x cap attempts
  in a row that timed out, the host's rows fail at once (``timeout: ... skipped``) for
  ``SKIP_S`` seconds, so a dead host cannot hold the last shards for rows x timeout.
* robots.txt (with --robots-txt, RFC 9309): fetched by the first row of each host, the host's
  other rows wait for it in the host's queue; 4xx means no rules; 5xx or 429 means "disallow
  all" as the RFC says (rows: opt-out); no answer at all (timeout, DNS, refused) disallows too,
  but the rows count as failures of that category, since no one opted out.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from data_tools import fetch, polite

SKIP_S = 300.0  # how long a host that kept timing out is skipped before it is tried again


@dataclass(eq=False)
class _Job:
    url: str
    future: Future[bytes]
    attempt: int = 0


@dataclass(eq=False)
class _Host:
    name: str
    queue: deque[_Job] = field(default_factory=deque)
    active: int = 0  # attempts in flight
    delayed: int = 0  # rows waiting on the clock for their own retry
    not_before: float = 0.0  # monotonic time the host asked us to wait for
    overloads: int = 0  # 429/503 answers in a row
    timeouts: int = 0  # timed-out attempts in a row
    skip_until: float = 0.0
    wake: bool = False  # a clock callback will pump the queue at not_before
    robots: polite.RobotsRules | None = None  # None until fetched (or not wanted)
    robots_state: str = "none"  # none -> fetching -> done


def host_of(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc.lower()


def _complete(future: Future[bytes], result: bytes | BaseException) -> None:
    with contextlib.suppress(Exception):  # InvalidStateError: already completed
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class Fetcher:
    """``threads`` fetch threads shared by every row of this process, per-host state kept."""

    def __init__(self, opts: fetch.FetchOptions, threads: int) -> None:
        self.opts = opts
        self.cap = max(1, opts.host_connections)
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self._ready: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"fetch-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        for _ in self._threads:
            self._ready.put(None)

    def submit(self, source: str, member: tuple[int, int] | None = None) -> Future[bytes]:
        """The bytes of ``source``, fetched by the pool; errors come back as ``FetchError``."""
        future: Future[bytes] = Future()
        if not source:
            _complete(future, fetch.FetchError("empty source: the row has no image path or URL"))
        elif fetch.is_http(source) and member is None:
            with self._lock:
                host = self._hosts.setdefault(host_of(source), _Host(host_of(source)))
                host.queue.append(_Job(source, future))
                self._pump(host)
        else:  # files, tar members, object stores: no host to be polite to

            def plain() -> None:
                try:
                    _complete(future, fetch.fetch_bytes(source, self.opts, member))
                except Exception as e:  # noqa: BLE001 - handed to the row, see chunks
                    _complete(future, e)

            self._ready.put(plain)
        return future

    def _work(self) -> None:
        while (task := self._ready.get()) is not None:
            task()

    # Everything below that touches a _Host runs under self._lock, except _attempt's fetch.

    def _pump(self, host: _Host) -> None:
        """Start as many of the host's queued rows as its cap and its backoff allow."""
        now = time.monotonic()
        if host.skip_until > now or host.not_before - now > self.opts.max_retry_after:
            self._fail_queue(host, now)
            return
        if host.robots_state == "fetching":
            return  # the robots.txt fetch pumps again when it is done
        while host.queue and host.active < self.cap:
            if host.not_before > now:
                if not host.wake:
                    host.wake = True
                    fetch.CLOCK.call_at(host.not_before, lambda: self._wake(host))
                return
            job = host.queue.popleft()
            host.active += 1
            if self.opts.robots_txt and host.robots_state == "none":
                host.robots_state = "fetching"
                self._ready.put(lambda h=host, j=job: self._robots_then_attempt(h, j))
                return
            self._ready.put(lambda h=host, j=job: self._attempt(h, j))

    def _fail_queue(self, host: _Host, now: float) -> None:
        if host.skip_until > now:
            why = (
                f"timeout: {{url}}: host {host.name} skipped: {host.timeouts} attempts in a "
                f"row got no complete answer within {self.opts.timeout:g} s"
            )
        else:
            why = (
                f"http 429: {{url}}: host {host.name} asked to wait "
                f"{host.not_before - now:.0f} s > --max-retry-after {self.opts.max_retry_after:g}"
            )
        while host.queue:
            job = host.queue.popleft()
            _complete(job.future, fetch.FetchError(why.format(url=job.url)))

    def _wake(self, host: _Host) -> None:
        with self._lock:
            host.wake = False
            self._pump(host)

    def _robots_then_attempt(self, host: _Host, job: _Job) -> None:
        parts = urllib.parse.urlsplit(job.url)
        rules = robots_rules(f"{parts.scheme}://{parts.netloc}", self.opts)
        with self._lock:
            host.robots, host.robots_state = rules, "done"
        self._attempt(host, job)

    def _attempt(self, host: _Host, job: _Job) -> None:
        """One try at one row, on a fetch thread; then the row is done or queued again."""
        result: bytes | BaseException
        retry_at: float | None = None
        try:
            self._check_robots(host, job.url)
            result = fetch.http_get(job.url, self.opts, fetch.opt_out_check(self.opts, job.url))
        except Exception as e:  # noqa: BLE001 - every error becomes the row's FetchError
            result, again = fetch.as_fetch_error(e, job.url)
            retry_at = self._retry_time(host, result, job) if again else None
        with self._lock:
            host.active -= 1
            if isinstance(result, bytes):
                host.overloads = host.timeouts = 0
            if retry_at is None:
                _complete(job.future, result)
            else:
                job.attempt += 1
                if retry_at <= host.not_before:  # the host's own wait: keep the row's place
                    host.queue.appendleft(job)
                else:
                    host.delayed += 1
                    fetch.CLOCK.call_at(retry_at, lambda: self._requeue(host, job))
            self._pump(host)
            self._forget_if_idle(host)

    def _forget_if_idle(self, host: _Host) -> None:
        # A run meets millions of hosts: keep only those with state worth keeping (work,
        # waits, a failure streak, robots rules).
        idle = not (host.active or host.delayed or host.queue or host.wake or host.overloads)
        idle = idle and not host.timeouts and host.robots_state == "none"
        if idle and host.skip_until < time.monotonic() and host.not_before < time.monotonic():
            self._hosts.pop(host.name, None)

    def _check_robots(self, host: _Host, url: str) -> None:
        if host.robots is None:
            return
        parts = urllib.parse.urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if not host.robots.allows(path):
            detail = host.robots.reason or f"disallowed for {self.opts.token}"
            if host.robots.failure:  # no answer at all: the row failed, nobody opted out
                raise fetch.FetchError(f"{host.robots.failure}: {url}: {detail}")
            raise fetch.OptOut(f"robots.txt: {url}: {detail}")

    def _retry_time(self, host: _Host, error: fetch.FetchError, job: _Job) -> float | None:
        """When to try the row again, or None when it fails now (runs on the fetch thread)."""
        now = time.monotonic()
        with self._lock:
            if str(error).startswith("timeout"):
                host.timeouts += 1
                if host.timeouts >= 2 * self.cap:
                    host.skip_until = now + SKIP_S
                    return None
            code = getattr(error, "code", None)
            wait = 0.0
            if code in (429, 503):  # the whole host waits, whether or not this row retries
                wait = getattr(error, "retry_after", None)
                if wait is None and host.not_before > now:
                    wait = host.not_before - now  # an answer to the same burst: no escalation
                elif wait is None:
                    wait = fetch.backoff_delay(self.opts, min(host.overloads, 6))
                    host.overloads += 1  # overloaded again after a wait: wait longer
                host.not_before = max(host.not_before, now + wait)
            if job.attempt >= self.opts.retries or wait > self.opts.max_retry_after:
                return None
            if code in (429, 503):
                return host.not_before
            return now + fetch.backoff_delay(self.opts, job.attempt)

    def _requeue(self, host: _Host, job: _Job) -> None:
        with self._lock:
            host.delayed -= 1
            host.queue.appendleft(job)
            self._pump(host)


def robots_rules(origin: str, opts: fetch.FetchOptions) -> polite.RobotsRules:
    """The rules of ``origin``'s robots.txt for our product token (RFC 9309 status handling)."""
    url = f"{origin}/robots.txt"
    failure: str | None = None
    for attempt in range(1 + max(0, opts.retries)):
        try:
            text = fetch.http_get(url, opts, limit=polite.ROBOTS_MAX_BYTES)
            return polite.parse_robots(text.decode("utf-8", "replace"), opts.token)
        except fetch.HTTPStatusError as e:
            if 400 <= e.code < 500 and e.code != 429:
                return polite.RobotsRules.allow_all()  # "unavailable": no rules apply
            reason, failure = f"http {e.code}", None
        except fetch.FetchError as e:
            reason = failure = str(e).split(":", 1)[0]
        if attempt < opts.retries:
            time.sleep(fetch.backoff_delay(opts, attempt))  # once per host: a short wait is fine
    why = f"{url} unreachable ({reason}): RFC 9309 disallows"
    return polite.RobotsRules.disallow_all(why, failure)


_current: tuple[tuple[object, ...], Fetcher] | None = None


def fetcher_for(run: str, opts: fetch.FetchOptions, threads: int) -> Fetcher:
    """This process's Fetcher for conversion ``run`` (its work folder): kept across chunks."""
    global _current
    key = (run, opts, threads)
    if _current is None or _current[0] != key:
        if _current is not None:
            _current[1].close()
        _current = (key, Fetcher(opts, threads))
    return _current[1]
