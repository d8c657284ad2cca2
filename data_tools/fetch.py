"""Bytes from local paths and any fsspec URL, with timeouts and retries for remote sources.

Used by ``python -m data_tools.convert``; fetch one source by hand with
``python -m data_tools.fetch SOURCE`` (prints its size).

http(s) goes through urllib rather than fsspec's HTTP filesystem: that one needs aiohttp, which
is not a dependency, and urllib gives a per-request timeout for free.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request

import fsspec

USER_AGENT = "clipforge-convert/1 (+https://github.com/clipforge)"


class FetchError(OSError):
    """A row's bytes could not be had; the message starts with a short failure category."""


def is_url(source: str) -> bool:
    return "://" in source


def resolve_source(source: str, base_dir: str) -> str:
    """Absolute path or URL for a table value; relative paths are taken against ``base_dir``."""
    if not source or is_url(source) or os.path.isabs(source) or not base_dir:
        return source
    if is_url(base_dir):
        return base_dir.rstrip("/") + "/" + source
    return os.path.join(base_dir, source)


def _fetch_once(source: str, timeout: float) -> bytes:
    if source.startswith(("http://", "https://")):
        request = urllib.request.Request(source, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    with fsspec.open(source, "rb") as f:
        return f.read()


def fetch_bytes(source: str, timeout: float = 10.0, retries: int = 2) -> bytes:
    """Read the whole object; remote sources are retried with backoff, local ones are not."""
    if not source:
        raise FetchError("empty source: the row has no image path or URL")
    attempts = 1 + (retries if is_url(source) and not source.startswith("file://") else 0)
    for attempt in range(attempts):
        try:
            return _fetch_once(source, timeout)
        except FileNotFoundError as e:
            # Retrying cannot make a missing object appear.
            raise FetchError(f"missing: {source}: {e}") from e
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:  # client errors are final; overload is not
                raise FetchError(f"http {e.code}: {source}") from e
            error: Exception = e
        except (OSError, ValueError) as e:
            error = e
        if attempt + 1 < attempts:
            time.sleep(0.5 * 2**attempt)
    raise FetchError(f"fetch failed: {source}: {type(error).__name__}: {error}") from error


if __name__ == "__main__":
    print(f"{sys.argv[1]}: {len(fetch_bytes(sys.argv[1]))} bytes")
