"""Samples out of one WebDataset tar, from any fsspec URL or a `pipe:` command, with a cheap skip.

    python -m clipforge.data.tario SHARD.tar [SKIP]     # print the keys and members of a shard

A sample is a run of consecutive tar members sharing a key: `dir/KEY.jpg`, `dir/KEY.txt` give
{"__key__": "dir/KEY", "jpg": b"...", "txt": b"..."}; the key is the name up to the first dot of
its last path part, as WebDataset names them. Members need not be in key order across samples
(img2dataset's are not), only grouped per sample.

`iter_samples(url, skip=n)` starts at the n-th sample without reading the data of the ones
before: on local files tarfile seeks past them, on streams it reads past them. The loader's
resume cost is therefore a header walk of at most one shard per stream, never a replay.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

import fsspec

# The image members of a shard sample the trainer reads (KEY.jpg, ...), in order of preference:
# the one list, also data_tools.inspect's test of a trainable shard (here, in a module without
# torch, so that the data tools start fast).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# What a torn, truncated or garbage shard raises while it is being walked.
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)


class ShardReadError(OSError):
    """A shard that cannot be opened or walked to its end; carries its URL."""

    def __init__(self, url: str, index: int, reason: str):
        super().__init__(f"{url}: unreadable at sample {index} ({reason})")
        self.url, self.index = url, index


class _Pipe:
    """`pipe:CMD`: the command's stdout, e.g. `pipe:aws s3 cp s3://b/0.tar -`."""

    def __init__(self, cmd: str):
        self._proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        self.stream: IO[bytes] = self._proc.stdout  # type: ignore[assignment]

    def close(self) -> None:
        self.stream.close()
        # Closing early (a skip that stops mid-shard) makes the writer die of SIGPIPE: not an error.
        self._proc.wait()


def split_name(name: str) -> tuple[str, str]:
    """`a/b/000017.seg.jpg` -> (`a/b/000017`, `seg.jpg`); the extension is lower-cased."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _open(url: str) -> tuple[Any, IO[bytes], bool]:
    """(closer, byte stream, seekable); only local files are worth seeking in."""
    if url.startswith("pipe:"):
        pipe = _Pipe(url[5:])
        return pipe, pipe.stream, False
    fs, path = fsspec.core.url_to_fs(url)
    f = fs.open(path, "rb")
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return f, f, local and not path.endswith((".gz", ".tgz"))


def iter_samples(url: str, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Samples of one shard from the `skip`-th on; each carries `__key__`, `__url__` and
    `__index__` (its position in the shard). Raises ShardReadError where the tar breaks."""
    index, sample = -1, None
    try:
        closer, stream, seekable = _open(url)
    except (FileNotFoundError, *READ_ERRORS) as e:
        raise ShardReadError(url, 0, f"{type(e).__name__}: {e}") from None
    try:
        try:
            # Only wraps `stream`, which the finally below closes.
            tar = tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*")  # noqa: SIM115
        except READ_ERRORS as e:
            raise ShardReadError(url, 0, f"{type(e).__name__}: {e}") from None
        while True:
            try:
                info = tar.next()
            except READ_ERRORS as e:
                raise ShardReadError(url, max(index, 0), f"{type(e).__name__}: {e}") from None
            if info is None:
                break
            tar.members.clear()  # tarfile keeps every header otherwise; shards hold millions
            key, ext = split_name(info.name)
            if not info.isfile() or not ext or key.rpartition("/")[2].startswith("."):
                continue  # folders, links, `._*` resource forks
            if sample is None or key != sample["__key__"]:
                if sample is not None and index >= skip:
                    yield sample
                index += 1
                sample = {"__key__": key, "__url__": url, "__index__": index}
            if index >= skip:
                try:
                    sample[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
                except READ_ERRORS as e:
                    raise ShardReadError(url, index, f"{type(e).__name__}: {e}") from None
        if sample is not None and index >= skip:
            yield sample
    finally:
        closer.close()


if __name__ == "__main__":
    for s in iter_samples(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0):
        members = {k: len(v) for k, v in s.items() if not k.startswith("__")}
        print(s["__index__"], s["__key__"], members)
