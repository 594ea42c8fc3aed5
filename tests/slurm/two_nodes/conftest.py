"""A real two-node Slurm cluster on this one machine: network namespaces for nodes.

`two_nodes` (session) builds a private test subnet: a bridge in the root namespace (the
controller's address, `.1`), and per node (`node1`, `node2`) a network namespace with a veth pair
into the bridge and its own address (`.11`, `.12`; loopback up, no default route: no traffic
leaves the subnet). slurmctld runs in the root namespace on the bridge's address; one slurmd per
namespace, `slurmd -N node1`, with its own spool, log and pid file under `<base>/node1/`
(SlurmdSpoolDir etc. with `%n`); one munged serves all (its socket is a file, which every
namespace sees). Each slurmd also gets a UTS namespace (hostname `node1`: torchrun's c10d
rendezvous hosts its store on the node whose hostname is the endpoint's) and a mount namespace
with an /etc/hosts of its own, written the way Debian writes one: the node's own name on
127.0.1.1, the other nodes by address (what a cluster's DNS answers). That is a real cluster's
trap, kept on purpose: gloo (megatron-core's CPU groups, and all of a CPU run) binds the address
the hostname resolves to, loopback here, unless GLOO_SOCKET_IFNAME names the interface (`eth0`
in every namespace). Jobs, their processes and their files share one file system, as on a
cluster whose checkpoints and logs live on a shared file system.

Teardown, also after a failure halfway through setup: jobs cancelled, the daemons killed by
their pid files, whatever still runs in a namespace killed by pid (`ip netns pids`), then the
veth pairs, namespaces and bridge removed by name and checked gone. Without Slurm, root, `ip`,
`unshare` or network namespaces, the tests skip and say why. Facts measured here (gVisor): a
bridge forwards between namespaces; deleting a namespace removes its veth pair only after a
while, so the root ends are deleted by name and waited for.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

IFACE = "eth0"
"""Each node's interface on the test subnet: what a site puts in GLOO_SOCKET_IFNAME."""
NAMES = ("node1", "node2")


@dataclass(frozen=True)
class Node:
    name: str
    """Slurm's NodeName and the hostname inside."""
    netns: str
    veth: str
    """The veth pair's end in the root namespace, on the bridge."""
    addr: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _why_no_two_nodes(parts, tag: str) -> str | None:
    reason = parts.why_not()
    if reason:
        return reason
    missing = [b for b in ("ip", "nsenter", "unshare", "mount") if shutil.which(b) is None]
    if missing:
        return f"two-node cluster needs {', '.join(missing)} (apt-get install iproute2 util-linux)"
    probe = _ip("netns", "add", f"{tag}-probe", check=False)
    if probe.returncode != 0:
        return f"no network namespaces here: ip netns add: {probe.stderr.strip()}"
    _ip("netns", "del", f"{tag}-probe", check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no address or route here overlaps."""
    text = _ip("-4", "-o", "addr").stdout + _ip("-4", "route", "show", "table", "all").stdout
    used = [ipaddress.ip_network(w, strict=False)
            for w in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?", text)]
    for third in range(256):
        net = ipaddress.ip_network(f"10.213.{(os.getpid() + third) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise AssertionError("no free /24 in 10.213.0.0/16 for the test subnet")


def _hosts(node: Node, nodes: list[Node], controller: str) -> str:
    """/etc/hosts as Debian writes it for `node`, plus what DNS would answer for the others."""
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{node.name}"]
    lines += [f"{n.addr}\t{n.name}" for n in nodes if n is not node]
    lines.append(f"{controller}\t{os.uname().nodename}")
    return "\n".join(lines) + "\n"


class Network:
    """The bridge, namespaces and veth pairs, each recorded as soon as it exists."""

    def __init__(self, tag: str, subnet: ipaddress.IPv4Network):
        self.tag, self.subnet = tag, subnet
        hosts = list(subnet.hosts())
        self.controller = str(hosts[0])
        self.bridge: str | None = None
        self.nodes: list[Node] = []
        self._addrs = {name: str(hosts[10 + i]) for i, name in enumerate(NAMES)}

    def build(self) -> None:
        name = f"{self.tag}br"
        _ip("link", "add", name, "type", "bridge")
        self.bridge = name
        _ip("addr", "add", f"{self.controller}/{self.subnet.prefixlen}", "dev", name)
        _ip("link", "set", name, "up")
        for i, node_name in enumerate(NAMES, 1):
            node = Node(node_name, f"{self.tag}-{node_name}", f"{self.tag}n{i}",
                        self._addrs[node_name])
            _ip("netns", "add", node.netns)
            self.nodes.append(node)
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", IFACE,
                "netns", node.netns)
            _ip("link", "set", node.veth, "master", name, "up")
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/{self.subnet.prefixlen}",
                "dev", IFACE)
            _ip("-n", node.netns, "link", "set", IFACE, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")

    def kill_everything_inside(self, wait_until) -> None:
        """SIGKILL every process left in a namespace (a job's orphans, a test's launcher)."""
        def pids(node):
            return [int(p) for p in _ip("netns", "pids", node.netns, check=False).stdout.split()]

        for node in self.nodes:
            for pid in pids(node):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wait_until(lambda: not any(pids(n) for n in self.nodes), 30,
                   "the namespaces' processes to exit")

    def remove(self, wait_until) -> None:
        for node in self.nodes:
            _ip("link", "del", node.veth, check=False)
            _ip("netns", "del", node.netns, check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)

        def gone():
            links = _ip("-o", "link", check=False).stdout
            spaces = _ip("netns", "list", check=False).stdout
            return not re.search(rf"\b{self.tag}", links + spaces)

        wait_until(gone, 30, f"the test network ({self.tag}*) to be removed")


def _on(base: Path, node: Node, *cmd: str) -> list[str]:
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup file
    # system slurmd 22.05 needs ("No filesystem mounted on /sys/fs/cgroup").
    script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
    return ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "--mount",
            "--propagation", "private", "--", "sh", "-c", script, "node-shell",
            str(base / node.name / "hosts"), node.name, *cmd]


class TwoNodes:
    """A running two-node cluster: the Slurm client (`slurm`), its nodes, and helpers to run a
    command on a node and to see where a job's ranks run."""

    def __init__(self, slurm, network: Network, base: Path, wait_until):
        self.slurm, self.network, self.base = slurm, network, base
        self.nodes = network.nodes
        self.iface = IFACE
        self.wait_until = wait_until
        """`wait_until(check, timeout, what)`: poll `check` until it returns something true."""

    def on(self, node: Node, *cmd: str) -> list[str]:
        """`cmd` as it runs on `node`: its network namespace, hostname and /etc/hosts."""
        return _on(self.base, node, *cmd)

    def ranks(self, match: dict[str, str]) -> dict[int, tuple[str, int]]:
        """The engine's processes now running whose environment has `match`: {RANK: (node,
        WORLD_SIZE)}, from each process's own environment and network namespace (/proc), not
        from anything a launcher printed."""
        by_inode = {os.stat(f"/run/netns/{n.netns}").st_ino: n.name for n in self.nodes}
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                # torchrun's workers: python -u -m engine train ... (not torchrun itself, nor
                # the helpers the workers spawn)
                if b"engine" not in argv[:4] or b"train" not in argv[:5]:
                    continue
                env = dict(item.split("=", 1) for item in
                           (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                           if "=" in item)
                inode = os.stat(proc / "ns" / "net").st_ino
            except OSError:  # it ended meanwhile
                continue
            if "RANK" in env and all(env.get(k) == v for k, v in match.items()):
                found[int(env["RANK"])] = (by_inode.get(inode, "root namespace"),
                                           int(env["WORLD_SIZE"]))
        return found

    def follow(self, job: str, *, timeout: float = 600) -> tuple[dict, dict[int, str]]:
        """Wait for `job` to finish, noting where each of its ranks ran (its first run's
        ranks, until all of them were seen): (scontrol's job info, {rank: node})."""
        seen: dict[int, tuple[str, int]] = {}

        def observe(_info) -> bool:
            if not seen or len(seen) < next(iter(seen.values()))[1]:
                seen.update(self.ranks({"SLURM_JOB_ID": job}))
            return False

        info = self.slurm.wait(job, timeout=timeout, until=observe)
        sizes = {size for _, size in seen.values()}
        assert len(sizes) <= 1, f"ranks of job {job} disagree on the world size: {seen}"
        return info, {rank: node for rank, (node, _) in sorted(seen.items())}


def _start_daemons(parts, network: Network, base: Path):
    for sub in ("state", "log"):
        (base / sub).mkdir()
    parts.start_munge(base)
    lines = []
    for node in network.nodes:
        (base / node.name / "spool").mkdir(parents=True)
        (base / node.name / "hosts").write_text(_hosts(node, network.nodes, network.controller))
        # The node line from the node's own view (a node that disagrees is drained); -C
        # names the node by its hostname, not by -N.
        line = subprocess.run(_on(base, node, "slurmd", "-C"), check=True, capture_output=True,
                              text=True, timeout=30).stdout.splitlines()[0]
        lines.append(re.sub(r"\s*UpTime=\S*", "", line) + f" NodeAddr={node.addr} State=UNKNOWN")
    slurmd = (f"SlurmdSpoolDir={base}/%n/spool\nSlurmdPidFile={base}/%n/slurmd.pid\n"
              f"SlurmdLogFile={base}/%n/slurmd.log")
    (base / "slurm.conf").write_text(parts.slurm_conf(
        base, controller=network.controller, slurmd=slurmd, nodes="\n".join(lines),
        name="enginetwo"))
    slurm = parts.Slurm(base, ("log/slurmctld.log", *(f"{n.name}/slurmd.log"
                                                       for n in network.nodes)))
    cluster = TwoNodes(slurm, network, base, parts.wait_until)
    commands = [["slurmctld"]] + [cluster.on(n, "slurmd", "-N", n.name) for n in network.nodes]
    for cmd in commands:  # each daemonizes: the command returns once it runs
        proc = subprocess.run(cmd, capture_output=True, text=True, env=slurm.env, timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} did not start: {proc.stderr}\n{slurm.logs()}")

    def idle():
        out = slurm.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        return sorted(filter(None, out)) == [f"{n} idle" for n in NAMES]

    parts.wait_until(idle, 60, "both nodes to be idle")
    return cluster


@pytest.fixture(scope="session")
def two_nodes(slurm_parts):
    tag = f"et{os.getpid() % 100000}"
    reason = _why_no_two_nodes(slurm_parts, tag)
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="engine-slurm2-"))
    base.chmod(0o755)  # munged (user munge) must reach its directory inside
    network = Network(tag, _free_subnet())
    cluster = None
    try:
        start = time.monotonic()
        network.build()
        cluster = _start_daemons(slurm_parts, network, base)
        print(f"two-node cluster up in {time.monotonic() - start:.1f} s: {base}, "
              f"{network.subnet}", file=sys.stderr)
        yield cluster
    finally:
        slurm_parts.cancel_all(cluster.slurm if cluster else None)
        for pidfile in [f"{n.name}/slurmd.pid" for n in network.nodes] + \
                ["slurmctld.pid", "munge/munged.pid"]:
            slurm_parts.kill_by_pidfile(base / pidfile)
        try:
            network.kill_everything_inside(slurm_parts.wait_until)
        finally:
            network.remove(slurm_parts.wait_until)
            shutil.rmtree(base, ignore_errors=True)
