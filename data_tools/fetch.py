"""Bytes from local paths, tar members and any fsspec URL: timeouts, retries, a size cap.

Used by ``python -m data_tools.convert``; fetch one source by hand with
``python -m data_tools.fetch SOURCE`` (prints its size).

Whole http(s) objects go through urllib, not fsspec's HTTP filesystem (aiohttp is a dependency,
for shard URLs, manifests and input tables on web servers; this is a choice, not a gap): urllib's
blocking calls suit the fetch threads, each request gets its own timeout, a Content-Length over
--max-bytes is refused before the body is read, and the status code names the failure ("http
404") and decides the retry. Tar members over http (ranged reads) and other URLs (s3://, gs://,
...) go through fsspec with the matching backend installed. Every error is a ``FetchError`` whose
message starts with a short category ("missing", "http 404", "timeout", ...), which the
converter counts per shard.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

USER_AGENT = "clipforge-convert/1 (+https://github.com/clipforge)"
DEFAULT_MAX_BYTES = 64 << 20  # no real photo is this large; a bigger answer is not an image


class FetchError(OSError):
    """A row's bytes could not be had; the message starts with a short failure category."""


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0  # seconds per attempt
    retries: int = 2  # extra attempts for remote sources on errors that may pass
    max_bytes: int = DEFAULT_MAX_BYTES
    user_agent: str = USER_AGENT
    backoff: float = 0.5  # seconds before the first retry, doubled each time


def is_url(source: str) -> bool:
    return "://" in source


def resolve_source(source: str, base_dir: str) -> str:
    """Absolute path or URL for an input value; relative paths are taken against ``base_dir``."""
    if not source or is_url(source) or os.path.isabs(source) or not base_dir:
        return source
    if is_url(base_dir):
        return base_dir.rstrip("/") + "/" + source
    return os.path.join(base_dir, source)


def _too_large(size: int, opts: FetchOptions, source: str) -> FetchError:
    return FetchError(f"file too large: {source}: {size} bytes > --max-bytes {opts.max_bytes}")


def _read_capped(f, opts: FetchOptions, source: str) -> bytes:
    data = f.read(opts.max_bytes + 1)
    if len(data) > opts.max_bytes:
        raise _too_large(len(data), opts, source)
    return data


def _http(source: str, opts: FetchOptions) -> bytes:
    request = urllib.request.Request(source, headers={"User-Agent": opts.user_agent})
    with urllib.request.urlopen(request, timeout=opts.timeout) as response:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > opts.max_bytes:
            raise _too_large(int(length), opts, source)  # refused before reading the body
        return _read_capped(response, opts, source)


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


def _fetch_once(source: str, opts: FetchOptions, member: tuple[int, int] | None) -> bytes:
    if source.startswith(("http://", "https://")) and member is None:
        return _http(source, opts)
    if not is_url(source):
        return _local(source, opts, member)
    if source.startswith("file://"):
        return _local(source[len("file://") :], opts, member)
    return _fsspec(source, opts, member)


def _retryable(error: Exception) -> tuple[bool, str]:
    """(worth another try, failure category)."""
    if isinstance(error, urllib.error.HTTPError):
        # Client errors are final; overload (429) and server errors may pass.
        return error.code >= 500 or error.code == 429, f"http {error.code}"
    reason = getattr(error, "reason", error)
    if isinstance(error, socket.timeout | TimeoutError) or isinstance(reason, socket.timeout):
        return True, "timeout"
    return True, "fetch failed"


def fetch_bytes(
    source: str, opts: FetchOptions | None = None, member: tuple[int, int] | None = None
) -> bytes:
    """The whole object (or the tar member at ``member=(offset, size)``).

    Remote sources are retried with exponential backoff and jitter; local ones are not,
    since retrying cannot make a missing file appear.
    """
    opts = opts or FetchOptions()
    if not source:
        raise FetchError("empty source: the row has no image path or URL")
    remote = is_url(source) and not source.startswith("file://")
    attempts = 1 + (max(0, opts.retries) if remote else 0)
    for attempt in range(attempts):
        try:
            return _fetch_once(source, opts, member)
        except FetchError:
            raise
        except (FileNotFoundError, IsADirectoryError) as e:
            raise FetchError(f"missing: {source}: {e.strerror or e}") from e
        except (OSError, ValueError) as e:  # urllib, socket and fsspec errors are all OSError
            again, category = _retryable(e)
            if not again or attempt + 1 == attempts:
                raise FetchError(f"{category}: {source}: {e}") from e
        # Jitter spreads retries of many threads so an overloaded host is not hit in lockstep.
        time.sleep(opts.backoff * 2**attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


if __name__ == "__main__":
    print(f"{sys.argv[1]}: {len(fetch_bytes(sys.argv[1]))} bytes")
