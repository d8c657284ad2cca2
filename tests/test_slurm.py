"""launch/slurm.sh on a real two-node Slurm cluster (tests/slurm/cluster.sh starts it).

CI runs as root and installs Debian's slurm-wlm + munge; elsewhere these tests skip with the
reason. Each node is a slurmd on 127.0.0.1 with its own port, so the job really crosses two
Slurm nodes, one torchrun per node, world size 2 over gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _sh(*cmd: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    def up() -> bool:
        if not shutil.which("sinfo"):
            return False
        out = _sh("sinfo", "-h", "-N", "-o", "%N %T").stdout
        return "node1" in out and "node2" in out and "down" not in out

    if not up():
        if os.geteuid() != 0 and not shutil.which("slurmctld"):
            pytest.skip("Slurm is not installed and installing it needs root")
        proc = _sh("bash", str(REPO / "tests" / "slurm" / "cluster.sh"), "start", timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"could not start a local Slurm cluster: {proc.stderr.strip()[-300:]}")
    return True


def _job_field(jid: str, field: str) -> str:
    out = _sh("scontrol", "show", "job", jid).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def _wait_state(jid: str, states: set[str], timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _job_field(jid, "JobState")
        if state in states:
            time.sleep(2)  # a requeue passes through terminal-looking states for a moment
            if _job_field(jid, "JobState") == state:
                return state
            continue
        time.sleep(1)
    raise TimeoutError(f"job {jid} stuck in {_job_field(jid, 'JobState')}")


def _submit(out: Path, *overrides: str, nodes: str = "2") -> str:
    proc = _sh(
        "sbatch",
        "--parsable",
        "-N",
        nodes,
        f"--output={out}",
        str(REPO / "launch" / "slurm.sh"),
        *overrides,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_train_and_checkpoint(cluster, tmp_path):
    run, out = tmp_path / "run", tmp_path / "job.out"
    jid = _submit(out, "experiment=smoke_cpu", f"run_dir={run}")
    state = _wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    log = out.read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "node node1 node_rank 0" in log and "node node2 node_rank 1" in log
    assert "world_size=2 ranks_per_node=1 nodes=2" in log
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step_00000004").is_dir()
    assert (run / "model.safetensors").is_file()


def test_invalid_config_fails_before_any_process_starts(cluster, tmp_path):
    run, out = tmp_path / "run", tmp_path / "job.out"
    jid = _submit(out, "experiment=smoke_cpu", f"run_dir={run}", "train.steps=0", "optim.lr=-1")
    state = _wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    log = out.read_text()
    assert state == "FAILED"
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.steps" in errors[0] and "optim.lr" in errors[0]
    assert "node_rank" not in log  # no srun task, no trainer was started


@pytest.fixture
def node2_back():
    """Whatever a test does to node2, it is back in service afterwards."""
    yield "node2"
    _sh("scontrol", "update", "nodename=node2", "state=resume")


def test_preemption_requeues_on_fewer_nodes_and_finishes(cluster, node2_back, tmp_path):
    """Preempted on 2 nodes, requeued while node2 is drained: the job comes back on node1
    alone (its pending request cut to the one node left, as an operator would; a job
    submitted with `sbatch -N 1-2` takes what is free by itself), the trainer re-partitions the ZeRO-2 state for one rank, keeps
    the global batch (train.batch_size 8 -> 16) and finishes every step exactly once."""
    run, out = tmp_path / "run", tmp_path / "job.out"
    jid = _submit(
        out,
        "experiment=smoke_cpu",
        f"run_dir={run}",
        "deepspeed=zero2",
        "train.steps=200",
        "checkpoint.every=1000",
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and len(_metrics(run)) >= 5:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"job never trained: {out.read_text()[-3000:] if out.exists() else ''}")
    assert "world_size=2 ranks_per_node=1 nodes=2" in out.read_text()
    # What `#SBATCH --signal=B:USR1@120` does before a time limit or preemption; meanwhile
    # node2 goes away (drained: it takes no new job once this one leaves it).
    assert _sh("scancel", "--signal=USR1", "--batch", jid).returncode == 0
    drain = _sh("scontrol", "update", f"nodename={node2_back}", "state=drain", "reason=test")
    assert drain.returncode == 0, drain.stderr
    # While the requeue kills the old batch script, the job can show a terminal state for a
    # moment; the restart counter is what says the requeue happened.
    deadline = time.time() + 120
    while time.time() < deadline and _job_field(jid, "Restarts") in ("", "0"):
        time.sleep(0.5)
    assert _job_field(jid, "Restarts") == "1", out.read_text()[-3000:]
    # Pending, asking for 2 nodes (2 tasks) with one left: it is given the one left.
    shrink = _sh("scontrol", "update", f"jobid={jid}", "NumNodes=1", "NumTasks=1")
    assert shrink.returncode == 0, shrink.stderr
    # The requeued job starts once the old job credential expires (cluster.sh: 10 s).
    state = _wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED"}, 420)
    log = out.read_text()
    assert state == "COMPLETED", log[-4000:]
    assert int(_job_field(jid, "Restarts")) == 1
    assert "preempted: saved step_" in log and "requeueing job" in log
    assert "world_size=1 ranks_per_node=1 nodes=1" in log
    assert "resuming a checkpoint of 2 ranks on 1" in log and "train.batch_size=16" in log
    steps = [m["step"] for m in _metrics(run)]
    # Resumed right after the saved step: no step is trained twice or skipped.
    assert steps == list(range(1, 201)), steps
    assert (run / "model.safetensors").is_file()
