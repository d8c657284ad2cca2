"""data_tools.convert --output s3://... against a real S3-protocol server on loopback.

    .venv/bin/python -m pytest tests/test_convert_s3.py -q

moto's standalone server (a separate process on 127.0.0.1, a free port) is the S3 endpoint; s3fs
finds it through AWS_ENDPOINT_URL with fake credentials, as a user's would through their own
settings. Real COCO-mini photos are converted straight into a bucket; a conversion is killed
with SIGKILL while a reader lists and downloads every object as it appears, and resumed on a
"different machine" (a fresh --work-dir) to the bytes of an uninterrupted local run; a writer
killed mid-upload leaves no object; the trainer then trains from the bucket.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipforge.data.shards import resolve
from data_tools import convert, inspect, merge_manifests, shards, store

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "clipforge-test"
ROWS, PER_SHARD = 90, 10
_SERVER = """
import sys, time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
while True:
    time.sleep(60)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[s3fs.S3FileSystem]:
    """A moto S3 server in its own process, and this process (and its children) pointed at it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    mp = pytest.MonkeyPatch()
    try:
        assert proc.stdout.readline().strip() == "ready"
        for key, value in env.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
    finally:
        mp.undo()
        s3fs.S3FileSystem.clear_instance_cache()
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def table(shared_data: Path, tmp_path_factory) -> Path:
    images = sorted((shared_data / "coco-mini" / "val2017").glob("*.jpg"))
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for i in range(ROWS):
            writer.writerow([str(images[i % len(images)]), f"row {i}"])
    return path


def _argv(table: Path, output: str) -> list[str]:
    return ["--input", str(table), "--output", output, "--image-size", "48", "--no-progress",
            "--samples-per-shard", str(PER_SHARD), "--chunk-rows", "6", "--processes", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(table: Path, tmp_path_factory) -> Path:
    """The same conversion, uninterrupted, into a local folder."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    assert convert.main(_argv(table, str(out))) == 0
    return out


def _objects(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.find(f"{BUCKET}/{prefix}")}


def _uploads(fs: s3fs.S3FileSystem, prefix: str) -> list[str]:
    reply = fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix=prefix)
    return [u["Key"] for u in reply.get("Uploads", [])]


def _whole(name: str, data: bytes) -> str | None:
    """None when an object is complete and valid, else what is wrong with it."""
    try:
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                samples = {m.name.split(".")[0] for m in tar.getmembers()}
            if len(samples) != PER_SHARD:  # ROWS is a multiple: every shard is full
                return f"{len(samples)} samples"
        elif name.endswith(".json"):
            json.loads(data)
        elif name.endswith(".parquet"):
            pq.read_table(io.BytesIO(data))
        else:
            return "unexpected name"
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return f"{type(e).__name__}: {e}"
    return None


class Watcher(threading.Thread):
    """Lists the prefix over and over and downloads each object the moment it appears: what a
    trainer or inspect reading the bucket during the conversion would get."""

    def __init__(self, prefix: str) -> None:
        super().__init__(daemon=True)
        # Its own client, no listing cache: every listing asks the server.
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        self.prefix = f"{BUCKET}/{prefix}"
        self.seen: dict[str, str | None] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                names = self.fs.find(self.prefix)
            except FileNotFoundError:
                names = []
            for path in names:
                if path.startswith(self.prefix) and path not in self.seen:
                    try:
                        self.seen[path] = _whole(path, self.fs.cat_file(path))
                    except FileNotFoundError:  # listed, then gone: it was never a final object
                        self.seen[path] = "vanished"
            time.sleep(0.02)

    def stats(self) -> int:
        return sum(p.endswith("_stats.json") for p in self.seen)


def test_kill_9_on_s3_never_shows_a_partial_object_and_resumes_to_the_same_bytes(
    s3, table: Path, reference: Path, tmp_path: Path
) -> None:
    url = f"s3://{BUCKET}/killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "data_tools.convert", *_argv(table, url)]
    watcher = Watcher("killed/")
    watcher.start()
    proc = subprocess.Popen(
        [*cmd, "--work-dir", str(tmp_path / "node-a")], cwd=ROOT, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while watcher.stats() < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "finished before it could be killed"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a preempted Slurm task
    finally:
        proc.wait()
        time.sleep(0.2)  # the watcher's last listing
        watcher.stop.set()
        watcher.join()
    assert watcher.stats() >= 2
    assert {p: e for p, e in watcher.seen.items() if e is not None} == {}
    assert not any(p.endswith(".tmp") for p in watcher.seen)
    left = _objects(s3, "killed/")
    assert "manifest.json" not in left and "plan.json" in left  # _work/plan.json: unfinished
    kept = {n: b for n, b in left.items() if n.endswith(".tar")}

    # Resume elsewhere: node-a's chunk files are gone with its local disk.
    assert convert.main([*_argv(table, url), "--work-dir", str(tmp_path / "node-b")]) == 0
    got = _objects(s3, "killed/")
    want = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()}
    assert sorted(got) == sorted(want)  # no _work/, no temporary names
    for name in want:
        if name != "manifest.json":
            assert got[name] == want[name], name  # tars, parquet reports, stats
    assert all(got[n] == b for n, b in kept.items())  # finished shards were not rewritten
    manifest = json.loads(got["manifest.json"])
    assert manifest["shards"] == shards.read_manifest(reference)["shards"]
    assert manifest["samples"] == ROWS and len(manifest["shards"]) == ROWS // PER_SHARD
    for entry in manifest["shards"]:
        assert hashlib.sha256(got[entry["name"]]).hexdigest() == entry["sha256"]
        assert len(got[entry["name"]]) == entry["bytes"]
    assert _uploads(s3, "killed/") == []  # the killed run's unfinished uploads were aborted
    assert list((tmp_path / "node-b").iterdir()) == []  # its own work folder removed, only
    assert inspect.main([url]) == 0  # every member decodes; sizes and sha256 match the manifest


def test_a_writer_killed_mid_upload_leaves_no_object(s3, tmp_path: Path) -> None:
    """Parts of a 6 MB shard are on the server when the writer dies: nothing is visible, and
    the resume's clean-up aborts the upload."""
    url = f"s3://{BUCKET}/torn/00000.tar"
    script = f"""
import os, fsspec
fsspec.config.conf["s3"] = {{"default_block_size": 5 * 2**20}}  # S3's smallest part
from data_tools import shards
writer = shards.ShardWriter({url!r})
for i in range(6):
    writer.add(f"{{i:09d}}", {{"bin": os.urandom(2**20)}})
print("parts sent", flush=True)
input()
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline().strip() == b"parts sent"
        assert _uploads(s3, "torn/") == ["torn/00000.tar"]  # 5 MB part uploaded
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    s3.invalidate_cache()
    assert not s3.exists(url) and _uploads(s3, "torn/") == ["torn/00000.tar"]
    assert store.clear_partials(f"s3://{BUCKET}/torn") == ["torn/00000.tar (unfinished upload)"]
    assert _uploads(s3, "torn/") == []

    # In process: an error while writing discards the upload instead of committing it.
    with pytest.raises(RuntimeError), shards.ShardWriter(url) as writer:
        writer.add("000000000", {"txt": b"half a shard"})
        raise RuntimeError("fetch died")
    s3.invalidate_cache()
    assert not s3.exists(url) and _uploads(s3, "torn/") == []


def test_slices_merge_and_inspect_on_s3(s3, table: Path, reference: Path) -> None:
    url = f"s3://{BUCKET}/sliced"
    for index in (0, 1):
        argv = [*_argv(table, url), "--slice-count", "2", "--slice-index", str(index)]
        assert convert.main(argv) == 0
    assert merge_manifests.main([url]) == 0
    manifest = shards.read_manifest(url)
    assert manifest["samples"] == ROWS and manifest["slices"] == ["part-00000", "part-00001"]
    loaded = resolve(url)
    assert loaded.urls[0] == f"{url}/part-00000/00000.tar" and sum(loaded.counts) == ROWS
    summary = inspect.inspect(url)
    assert summary["samples"] == ROWS and not summary["problems"] and not summary["invalid"]


def test_memory_filesystem_output_is_the_local_bytes(table: Path, reference: Path) -> None:
    """fsspec's memory:// shows a file while it is written (it ignores autocommit=False), so
    it takes the temporary name + fs.mv route: an aborted shard leaves nothing, a temporary name
    a killed run left behind is removed, and the bytes are the local run's."""
    import fsspec

    how = "move"
    url = f"memory://clipforge-test/{how}"
    assert store.kind(url) == how
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"/clipforge-test/{how}/00004.tar.tmp", b"torn")
    try:
        with pytest.raises(RuntimeError), shards.ShardWriter(f"{url}/00009.tar") as writer:
            writer.add("000000000", {"txt": b"half a shard"})
            raise RuntimeError("fetch died")
        assert convert.main(_argv(table, url)) == 0
        got = {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.find(f"/clipforge-test/{how}")}
    finally:
        fs.rm(f"/clipforge-test/{how}", recursive=True)
    want = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()}
    assert sorted(got) == sorted(want)
    assert all(got[n] == want[n] for n in want if n != "manifest.json")


def test_a_changed_finished_shard_is_not_trusted(
    table: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finished shards are known by their stats; a tar whose size is not the recorded one
    stops the resume with one line instead of being listed in a manifest."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001_stats.json"):
        (out / name).write_bytes((reference / name).read_bytes())
    (out / "00001.tar").write_bytes((reference / "00001.tar").read_bytes()[:-10240])
    assert convert.main(_argv(table, str(out))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "00001.tar" in err[0] and "changed after it was written" in err[0]
    assert not (out / "manifest.json").exists()


def test_trainer_trains_from_the_bucket(s3, table: Path, reference: Path, tmp_path: Path) -> None:
    """clipforge.train with data.train=s3://...: sizes from the manifest in the bucket, samples
    streamed by a DataLoader worker process through s3fs."""
    url = f"s3://{BUCKET}/train"
    assert convert.main(_argv(table, url)) == 0
    tok = tmp_path / "tok.model"
    run = [sys.executable, "-m", "data_tools.tokenizer", "--input", str(reference)]
    subprocess.run([*run, "--output", str(tok), "--vocab-size", "48"], cwd=ROOT, check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "clipforge.train", "experiment=smoke_cpu", f"run_dir={run_dir}",
         "data.synthetic=false", f"data.train={url}", f"data.tokenizer={tok}",
         "data.workers=1", "data.shuffle_buffer=20", "train.batch_size=15", "train.steps=2",
         "checkpoint.every=0", "deepspeed=zero0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert all(r.get("data_errors", 0) == 0 for r in rows)


def test_unusable_outputs_are_one_error_line(
    s3, table: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for url, says in (
        ("s3://no-such-bucket-here/ds", "no-such-bucket-here"),
        ("nosuchproto://x/ds", "nosuchproto"),
    ):
        assert convert.main(_argv(table, url)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --output") and says in err[0], err


def test_chunk_files_stay_on_local_disk() -> None:
    parser = convert.build_parser()
    base = ["--input", "rows.csv"]
    local = parser.parse_args([*base, "--output", "out"])
    assert convert.work_dir(local, convert.output_dir(local)) == Path("out").resolve() / "_work"
    url = parser.parse_args([*base, "--output", "file:///data/out"])
    assert convert.work_dir(url, convert.output_dir(url)) == Path("/data/out/_work")
    remote = parser.parse_args([*base, "--output", "s3://b/ds/", "--slice-count", "2"])
    works = []
    for index in (0, 1):
        remote.slice_index = index
        out = convert.output_dir(remote)
        assert out == f"s3://b/ds/part-0000{index}"
        works.append(convert.work_dir(remote, out))
    assert works[0] != works[1]
    assert all(w.parent == Path(tempfile.gettempdir()) / "clipforge-work" for w in works)
    remote.work_dir = "/scratch/w"  # a folder of its own inside, named after the output
    assert (
        convert.work_dir(remote, convert.output_dir(remote)) == Path("/scratch/w") / works[1].name
    )
