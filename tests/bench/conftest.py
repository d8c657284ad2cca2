"""Shared helpers for benchmarks (``make bench`` = ``pytest -q -s tests/bench``).

Files named ``bench_*.py`` here are collected as tests, so ``make test`` (which skips this
folder) never runs them. Peers are installed into their own venvs under ``.bench/`` (gitignored).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
BENCH_DIR = REPO / ".bench"

# A loopback image server in its own process, so neither tool under test shares its GIL.
# Serves the files of one folder from memory as /img/N.jpg (N modulo the file count; any query
# string is ignored), answers 404 otherwise, and prints its port once it listens.
_SERVER = r"""
import http.server, pathlib, sys
files = [p.read_bytes() for p in sorted(pathlib.Path(sys.argv[1]).glob("*.jpg"))]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        try:
            body = files[int(name.split(".")[0]) % len(files)]
        except ValueError:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], len(files), flush=True)
server.serve_forever()
"""


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # A file named on the command line is collected by pytest itself: don't collect it twice.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.name.startswith("bench_") and file_path.suffix == ".py":
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def image_server() -> Iterator[tuple[str, int]]:
    """(base URL, number of distinct images): the 159 COCO-mini val2017 JPEGs."""
    folder = SHARED_DATA / "coco-mini" / "val2017"
    if not folder.is_dir():
        pytest.skip(f"third-party test data not found at {folder} (../shared/data)")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        port, count = map(int, proc.stdout.readline().split())  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}", count
    finally:
        proc.terminate()
        proc.wait()


@pytest.fixture(scope="session")
def peer_venv() -> Callable[[str, str], Path]:
    """``peer_venv(name, requirement)`` -> ``.bench/<name>-venv``, created only when missing."""

    def make(name: str, requirement: str) -> Path:
        venv = BENCH_DIR / f"{name}-venv"
        marker = venv / ".installed"
        if not marker.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, requirement], check=True)
            marker.write_text(requirement + "\n")
        return venv

    return make
