"""launch/slurm/train.sbatch over two Slurm nodes (tests/slurm/two_nodes/conftest.py: two network
namespaces, one slurmd each), the tiny recipe at one process a node:

- TP=2 across the nodes, and DP=2 with the distributed optimizer: the TensorBoard losses equal
  those of the same layout on one machine (launch/local.sh, 2 processes), each rank ran where it
  should (seen in /proc: rank 0 on node1, rank 1 on node2), and both nodes wrote their shards of
  the checkpoint;
- that checkpoint resumes on one node (both ranks on node1) and on two nodes at another layout
  (TP=2 -> DP=2, resharded), continuing the same loss curve;
- USR1 to the batch shell and to every task on both nodes at once: one stop, one save, one
  requeue; the requeued job resumes, every step runs once, the job ends COMPLETED;
- launch/local.sh over two machines without Slurm (ENGINE_NNODES=2, ENGINE_NODE_RANK), one per
  namespace, trains the same curve;
- a node whose name resolves to loopback without GLOO_SOCKET_IFNAME: one line, no start.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
RECIPE = "configs/tiny-cpu.yaml"
STEPS = 6
RTOL = 1e-5  # fp32; the same layout over a network or not sums the same numbers
LAYOUTS = {  # name: (overrides, what rank 0 logs of its layout)
    "tp2": ([], "tp=2 pp=1 vpp=None dp=1"),
    "dp2_distopt": (["parallel.tp=1", "parallel.sequence_parallel=false",
                     "parallel.distributed_optimizer=true"], "tp=1 pp=1 vpp=None dp=2"),
}


@dataclass
class Run:
    tmp: Path
    job: str
    info: dict
    ranks: dict[int, str]
    """Where each rank ran, as /proc saw it: {rank: node}."""

    def out(self) -> str:
        path = self.tmp / f"engine-train-{self.job}.out"
        return path.read_text() if path.is_file() else f"(no {path})"

    def log(self, restart: int = 0) -> Path:
        return self.tmp / "logs" / f"engine-train-{self.job}-r{restart}.log"

    def why(self) -> str:
        logs = sorted((self.tmp / "logs").glob("*.log"))
        return "\n".join([self.out(), *(p.read_text()[-3000:] for p in logs)])


def submit(cluster, tmp: Path, nodes: int, nproc: int, *overrides: str, **env: str) -> str:
    """train.sbatch on `nodes` nodes x `nproc` processes, no GPUs; GLOO_SOCKET_IFNAME as a site
    sets it in launch/slurm/env.sh."""
    tmp.mkdir(parents=True, exist_ok=True)  # Slurm opens --output there before the script runs
    return cluster.slurm.sbatch(
        f"--nodes={nodes}", "--ntasks-per-node=1", "--gpus-per-node=0",
        f"--output={tmp}/%x-%j.out", "launch/slurm/train.sbatch", RECIPE, *overrides,
        env={"ENGINE_NPROC_PER_NODE": str(nproc), "ENGINE_LOG_DIR": str(tmp / "logs"),
             "GLOO_SOCKET_IFNAME": cluster.iface, **env})


def _local(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A launch/local.sh in its own session, so that torchrun and its workers end together."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def across(two_nodes, launch, tiny_overrides, tmp_path_factory):
    """Each layout as a two-node job (1 process a node) while launch/local.sh runs it on this
    machine (2 processes): {layout: (the job's Run, the local run's directory)}."""
    jobs = {}
    for name, (layout, _) in LAYOUTS.items():  # both queued now: the second starts at once
        tmp = tmp_path_factory.mktemp(f"two-{name}")
        jobs[name] = tmp, submit(two_nodes, tmp, 2, 1, *tiny_overrides(tmp, STEPS), *layout,
                                 **launch.env())
    runs = {}
    for name, (layout, _) in LAYOUTS.items():
        local = tmp_path_factory.mktemp(f"local-{name}")
        proc = _local(["launch/local.sh", RECIPE, *tiny_overrides(local, STEPS), *layout],
                      {**two_nodes.slurm.env, **launch.env(ENGINE_NPROC_PER_NODE="2")},
                      local / "local.log")
        tmp, job = jobs[name]
        try:
            info, ranks = two_nodes.follow(job, timeout=600)
        finally:
            assert _finish([proc], timeout=600) == [0], (local / "local.log").read_text()[-3000:]
        runs[name] = Run(tmp, job, info, ranks), local
    return runs


@pytest.mark.parametrize("name", LAYOUTS)
def test_two_nodes_train_like_one(launch, across, name):
    run, local = across[name]
    assert run.info["JobState"] == "COMPLETED", run.why()
    assert run.info["NodeList"] == "node[1-2]" and run.info["BatchHost"] == "node1"
    assert run.ranks == {0: "node1", 1: "node2"}  # one process a node, rank 0 on the first
    port = 20000 + (int(run.job) % 10000) * 4
    assert f"2 node(s) x 1 process(es), rendezvous node1:{port}" in run.out()
    assert f"rank 0/2 on cpu (gloo): {LAYOUTS[name][1]}" in run.log().read_text()
    assert launch.steps(run.log()) == list(range(1, STEPS + 1))
    two, one = launch.losses(run.tmp / "tb"), launch.losses(local / "tb")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    assert two == pytest.approx(one, rel=RTOL)
    # Each rank wrote its own shard files (`__<rank>_<n>.distcp`) into the shared directory.
    ckpt = run.tmp / "ckpt" / f"iter_{STEPS:07d}"
    assert {p.name.split("_")[2] for p in ckpt.glob("__*_*.distcp")} == {"0", "1"}


def test_two_node_checkpoint_resumes_on_one_node_and_on_two(two_nodes, launch, tiny_overrides,
                                                            across, tmp_path):
    """From step 3 of the TP=2 job: on one node at the same layout (node2's shards read on
    node1), and on two nodes at DP=2 (resharded), each continuing the uninterrupted curve."""
    run = across["tp2"][0]
    source = run.tmp / "ckpt" / "iter_0000003"
    cases = {"one_node": (1, 2, [], {0: "node1", 1: "node1"}, "tp=2 pp=1 vpp=None dp=1"),
             "two_nodes_dp2": (2, 1, ["parallel.tp=1", "parallel.sequence_parallel=false"],
                               {0: "node1", 1: "node2"}, "tp=1 pp=1 vpp=None dp=2")}
    jobs = {}
    for name, (nodes, nproc, layout, _, _) in cases.items():
        tmp = tmp_path / name
        jobs[name] = tmp, submit(two_nodes, tmp, nodes, nproc, *tiny_overrides(tmp, STEPS),
                                 f"checkpoint.load={source}", *layout, **launch.env())
    expected = launch.losses(run.tmp / "tb")
    for name, (tmp, job) in jobs.items():
        info, ranks = two_nodes.follow(job, timeout=600)
        resumed = Run(tmp, job, info, ranks)
        assert info["JobState"] == "COMPLETED", resumed.why()
        _, _, _, where, layout = cases[name]
        assert ranks == where, name
        log = resumed.log().read_text()
        assert f"rank 0/2 on cpu (gloo): {layout}" in log
        assert f"resumed from {source} at step 3" in log
        assert launch.steps(resumed.log()) == [4, 5, 6]
        losses = launch.losses(tmp / "tb")
        assert sorted(losses) == [4, 5, 6]
        assert losses == pytest.approx({s: expected[s] for s in losses}, rel=RTOL), name


def test_preempted_two_node_job_saves_once_requeues_and_resumes(two_nodes, launch,
                                                                tiny_overrides, across,
                                                                tmp_path):
    """`scancel --full --signal=USR1`: the batch shell (on node1; it creates the stop file),
    srun, and every task on both nodes (torchrun forwards it too) get it at once."""
    job = submit(two_nodes, tmp_path, 2, 1, *tiny_overrides(tmp_path, STEPS), **launch.env())
    run = Run(tmp_path, job, {}, {})
    first = run.log(0)
    two_nodes.slurm.wait(job, timeout=600, release_requeued=False,
                         until=lambda _: first.exists() and 2 in launch.steps(first))
    two_nodes.slurm.run("scancel", "--full", "--signal=USR1", job)
    run.info, run.ranks = two_nodes.follow(job, timeout=600)
    assert run.info["JobState"] == "COMPLETED", run.why()
    assert run.info["Restarts"] == "1", run.why()
    assert run.ranks == {0: "node1", 1: "node2"}

    steps = [launch.steps(run.log(r)) for r in (0, 1)]
    assert [s for part in steps for s in part] == list(range(1, STEPS + 1)), steps
    stopped = steps[0][-1]
    assert stopped >= 2 and steps[1][0] == stopped + 1
    text = run.log(0).read_text()
    assert text.count("stopping at step") == 1 and f"stopping at step {stopped}: " in text
    assert text.count(f"saved checkpoint {tmp_path}/ckpt/iter_{stopped:07d}") == 1
    assert f"resumed from {tmp_path}/ckpt/iter_{stopped:07d} at step {stopped}" in \
        run.log(1).read_text()
    out = run.out()
    assert out.count("requeueing") == 1 and f"stopped at step {stopped} on SIGUSR1" in out
    assert "finished; see" in out
    assert launch.losses(tmp_path / "tb") == pytest.approx(
        launch.losses(across["tp2"][0].tmp / "tb"), rel=RTOL)
    assert not list((tmp_path / "logs").glob(".engine-train-*"))  # control files cleaned up


def test_local_sh_over_two_machines(two_nodes, launch, tiny_overrides, across, tmp_path):
    """The same command on each namespace, only ENGINE_NODE_RANK differing; the first machine's
    name as the endpoint (each node resolves it: loopback on node1, its address on node2)."""
    env = {**two_nodes.slurm.env, **launch.env(ENGINE_NNODES="2", ENGINE_MASTER_ADDR="node1",
                                               ENGINE_NPROC_PER_NODE="1",
                                               GLOO_SOCKET_IFNAME=two_nodes.iface,
                                               ENGINE_TEST_RUN=str(tmp_path))}
    procs = [_local(two_nodes.on(node, "env", f"ENGINE_NODE_RANK={rank}", "launch/local.sh",
                                 RECIPE, *tiny_overrides(tmp_path, STEPS)),
                    env, tmp_path / f"{node.name}.log")
             for rank, node in enumerate(two_nodes.nodes)]
    ranks = {}

    def both_seen():
        ranks.update({r: n for r, (n, _) in two_nodes.ranks({"ENGINE_TEST_RUN": str(tmp_path)})
                      .items()})
        return len(ranks) == 2 or any(p.poll() is not None for p in procs)

    try:
        two_nodes.wait_until(both_seen, 300, "both machines' ranks")
    finally:
        codes = _finish(procs, timeout=600)
    logs = {n.name: (tmp_path / f"{n.name}.log").read_text() for n in two_nodes.nodes}
    assert codes == [0, 0], "\n".join(text[-3000:] for text in logs.values())
    assert ranks == {0: "node1", 1: "node2"}
    assert "rank 0/2 on cpu (gloo): tp=2 pp=1 vpp=None dp=1" in logs["node1"]
    assert launch.losses(tmp_path / "tb") == pytest.approx(
        launch.losses(across["tp2"][0].tmp / "tb"), rel=RTOL)


def test_loopback_node_name_without_gloo_interface_is_refused(two_nodes, launch, tmp_path):
    """Each node's /etc/hosts maps its own name to 127.0.1.1 (Debian's default); without
    GLOO_SOCKET_IFNAME gloo would listen there and the other node could not connect."""
    job = submit(two_nodes, tmp_path, 2, 1, "train.steps=1", GLOO_SOCKET_IFNAME="",
                 **launch.env())
    info = two_nodes.slurm.wait(job, timeout=120, release_requeued=False)
    out = (tmp_path / f"engine-train-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", out
    assert out.strip().splitlines() == [
        "train.sbatch: error: this node's name node1 resolves to 127.0.1.1 (not an address the "
        "other nodes reach): gloo would listen there; set GLOO_SOCKET_IFNAME to the interface "
        "the nodes reach each other on (launch/slurm/env.sh)"]
    assert not (tmp_path / "logs").exists()  # nothing started
