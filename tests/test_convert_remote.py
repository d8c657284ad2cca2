"""The converter against a real loopback HTTP server, a real kill -9, and Slurm-style slices.

    .venv/bin/python -m pytest tests/test_convert_remote.py -q

The server (http.server in a thread on 127.0.0.1, port 0) serves real COCO-mini JPEGs, images in
odd colour modes, and every kind of bad answer; a tenth of the dump's rows are bad.
"""

from __future__ import annotations

import contextlib
import csv
import http.server
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipforge.data.shards import resolve
from data_tools import convert, merge_manifests, shards

ROOT = Path(__file__).resolve().parents[1]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def odd_images() -> dict[str, bytes]:
    """Good images in the modes that trip converters up."""
    cmyk = io.BytesIO()
    Image.new("CMYK", (80, 60), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    return {
        "cmyk.jpg": cmyk.getvalue(),
        "palette.png": _png(Image.new("RGB", (70, 50), (0, 128, 0)).convert("P")),
        "rgba.png": _png(Image.new("RGBA", (60, 60), (255, 0, 0, 128))),
        "gray16.png": _png(Image.fromarray(np.full((40, 50), 40000, dtype=np.uint16))),
        "gray.png": _png(Image.new("L", (50, 40), 90)),
    }


class Server:
    """Routes: /img/N.jpg, /odd/NAME, /404, /slow, /truncated, /empty, /text, /bomb, /flaky/N."""

    def __init__(self, jpegs: list[bytes], slow_s: float) -> None:
        self.jpegs, self.slow_s = jpegs, slow_s
        self.odd = odd_images()
        self.bomb = _png(Image.new("1", (3000, 3000)))  # 9 Mpx in a few KB
        self.flaky_seen: set[str] = set()
        self.lock = threading.Lock()

    def body(self, path: str) -> tuple[int, bytes]:
        name = path.split("?")[0]
        if name.startswith("/img/"):
            return 200, self.jpegs[int(name[5:].split(".")[0]) % len(self.jpegs)]
        if name.startswith("/odd/"):
            return 200, self.odd[name[5:]]
        if name == "/slow":
            time.sleep(self.slow_s)
            return 200, self.jpegs[0]
        if name.startswith("/flaky/"):
            with self.lock:  # the first try answers 503, the retry gets the image
                first = name not in self.flaky_seen
                self.flaky_seen.add(name)
            return (503, b"busy") if first else (200, self.jpegs[1])
        fixed = {
            "/truncated": self.jpegs[2][: len(self.jpegs[2]) // 2],
            "/empty": b"",
            "/text": b"<html>not an image</html>",
            "/bomb": self.bomb,
        }
        return (200, fixed[name]) if name in fixed else (404, b"not found")

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                code, data = server.body(self.path)
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # The client may have given up (timeout): that is the point of /slow.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def server(shared_data: Path) -> Iterator[tuple[str, Server]]:
    jpegs = [p.read_bytes() for p in sorted((shared_data / "coco-mini" / "val2017").glob("*.jpg"))]
    state = Server(jpegs[:40], slow_s=3.0)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    httpd.shutdown()
    httpd.server_close()


# Bad rows: (url or path, expected status, expected error category).
BAD = [
    ("{url}/404", "failed", "http 404"),
    ("{url}/slow", "failed", "timeout"),
    ("{url}/truncated", "failed", "decode failed"),
    ("{url}/empty", "failed", "empty file"),
    ("{url}/text", "failed", "not an image"),
    ("{url}/bomb", "failed", "image too large"),
    ("{tmp}/missing.jpg", "failed", "missing"),
    ("{tmp}/corrupt.jpg", "failed", "decode failed"),
    ("http://127.0.0.1:9/refused.jpg", "failed", "fetch failed"),
    ("", "failed", "empty source"),
]


def bad_dump(tmp: Path, url: str) -> tuple[Path, dict[int, tuple[str, str]]]:
    """100 rows, every 10th bad; good rows include odd modes, a flaky URL and bad UTF-8."""
    (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    odd = list(odd_images())
    rows, expected = [], {}
    for i in range(100):
        caption = f"row {i}".encode()
        if i % 10 == 9:
            source, status, category = BAD[i // 10]
            source = source.format(url=url, tmp=tmp)
            expected[i] = (status, category)
        elif i % 10 == 3:
            source = f"{url}/odd/{odd[(i // 10) % len(odd)]}"
        elif i == 4:
            source = f"{url}/flaky/{i}.jpg"
        else:
            source = f"{url}/img/{i}.jpg?i={i}"
        if i == 5:
            caption = b"bad \xff\xfe utf-8 " + caption
        rows.append(source.encode() + b"\t" + caption + b"\n")
    table = tmp / "dump.tsv"
    table.write_bytes(b"url\tcaption\n" + b"".join(rows))
    return table, expected


def test_bad_dump_every_good_row_lands_every_bad_row_has_its_reason(
    server: tuple[str, Server], tmp_path: Path
) -> None:
    url, _ = server
    table, expected = bad_dump(tmp_path, url)
    out = tmp_path / "out"
    argv = ["--input", str(table), "--output", str(out), "--image-size", "64"]
    argv += ["--timeout", "1.5", "--retries", "1", "--max-pixels", "4000000", "--processes", "2"]
    assert convert.main([*argv, "--samples-per-shard", "25", "--chunk-rows", "20"]) == 0
    manifest = shards.read_manifest(out)
    assert manifest["samples"] == 90 and [s["samples"] for s in manifest["shards"]] == [25] * 3 + [
        15
    ]
    report = [r for name in manifest["reports"] for r in pq.read_table(out / name).to_pylist()]
    assert [r["key"] for r in report] == [f"{i:09d}" for i in range(100)]
    for i, r in enumerate(report):
        if i in expected:
            status, category = expected[i]
            assert r["status"] == status and r["error"].startswith(category + ":"), (i, r)
        else:
            assert r["status"] == "ok", (i, r)
    assert report[5]["note"] == "caption: invalid UTF-8 dropped"
    assert manifest["failure_reasons"]["timeout"] == 1 and manifest["status"]["failed"] == 10


def test_size_cap_and_user_agent(server: tuple[str, Server], tmp_path: Path) -> None:
    from data_tools import fetch

    url, _ = server
    opts = fetch.FetchOptions(timeout=2, retries=0, max_bytes=1000)
    with pytest.raises(fetch.FetchError, match="^file too large"):
        fetch.fetch_bytes(f"{url}/img/0.jpg", opts)
    assert fetch.fetch_bytes(f"{url}/odd/gray.png", fetch.FetchOptions(user_agent="x/1"))


def _write_rows(path: Path, images: list[Path], n: int) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for i in range(n):
            writer.writerow([str(images[i % len(images)]), f"row {i}"])
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[0-9]*")) if p.is_file()}


def test_kill_9_then_rerun_gives_the_same_bytes(shared_data: Path, tmp_path: Path) -> None:
    images = sorted((shared_data / "coco-mini" / "val2017").glob("*.jpg"))
    table = _write_rows(tmp_path / "rows.csv", images, 160)
    argv = ["--input", str(table), "--image-size", "64", "--resize-mode", "center_crop"]
    argv += ["--samples-per-shard", "10", "--chunk-rows", "8", "--no-progress"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "data_tools.convert", *argv, "--output", str(killed)]
    proc = subprocess.Popen([*cmd, "--processes", "2"], cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(killed.glob("*_stats.json"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "finished before it could be killed"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, as Slurm would
    finally:
        proc.wait()
    assert not (killed / "manifest.json").exists() and (killed / "00001.tar").exists()
    kept = {n: b for n, b in _files(killed).items() if n.endswith(".tar")}
    assert convert.main([*argv, "--output", str(killed), "--processes", "1"]) == 0
    reference = tmp_path / "reference"
    assert convert.main([*argv, "--output", str(reference), "--processes", "1"]) == 0
    assert _files(killed) == _files(reference)
    assert all(_files(killed)[n] == b for n, b in kept.items())  # finished shards were kept
    got, want = shards.read_manifest(killed), shards.read_manifest(reference)
    assert got["shards"] == want["shards"] and got["samples"] == 160
    assert [s["samples"] for s in got["shards"]] == [10] * 16


def test_slurm_slices_then_merge(shared_data: Path, tmp_path: Path) -> None:
    images = sorted((shared_data / "coco-mini" / "train2017").glob("*.jpg"))
    table = _write_rows(tmp_path / "rows.csv", images, 50)
    out = tmp_path / "out"
    argv = ["--input", str(table), "--output", str(out), "--image-size", "32"]
    argv += ["--samples-per-shard", "8", "--slice-count", "3", "--no-progress"]
    for index in (0, 2):
        assert convert.main([*argv, "--slice-index", str(index)]) == 0
    assert merge_manifests.main([str(out)]) == 2  # slice 1 missing: a clear error, no manifest
    assert not (out / "manifest.json").exists()
    assert convert.main([*argv, "--slice-index", "1"]) == 0
    assert merge_manifests.main([str(out)]) == 0
    manifest = shards.read_manifest(out)
    assert manifest["samples"] == 50 and manifest["slices"] == [f"part-0000{i}" for i in range(3)]
    names = [s["name"] for s in manifest["shards"]]
    assert names[:3] == ["part-00000/00000.tar", "part-00000/00001.tar", "part-00001/00000.tar"]
    keys = [r["key"] for name in manifest["reports"] for r in pq.read_table(out / name).to_pylist()]
    assert keys == [f"{i:09d}" for i in range(50)]  # slices are contiguous, in input order
    loaded = resolve(str(out))  # the training loader reads the merged manifest as is
    assert sum(loaded.counts) == 50 and all(Path(u).exists() for u in loaded.urls)


def test_sbatch_script_is_valid_bash_with_array_and_srun() -> None:
    script = (ROOT / "launch" / "convert_slurm.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / "convert_slurm.sh")]).returncode == 0
    for needle in ("#SBATCH --array", "srun", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        assert needle in script
    assert "data_tools.merge_manifests" in script
    assert "--dependency=afterok" in script.replace('"', "")
