"""Several hosts sharing one store through a network filesystem: the harness.

A *file server* network namespace runs the servers of an engine
(``multihost_engines.py``: sshfs's sshd, GlusterFS, JuiceFS and Redis...),
listening only on the server's private addresses.  Each *host* is a network
namespace linked to the server by a veth pair on a /24 of its own
(10.231.<i>.0/24: the server is .1, the host .2).  A host runs
``multihost_worker.py`` in UTS and PID namespaces of its own: its own
hostname, and pids that start at 1, so two hosts' processes have the same
pids, as containers do.  The worker mounts the shared filesystem with the
engine's client and runs the jobs below its mount.

The test reads what is "on the server" through :meth:`Cluster.store_dir`:
the exported directory itself (sshfs), or an *observer*, a client of the
engine's with no caches, mounted from the server's network namespace.
Everything the cluster starts runs in its namespaces and is killed, its
mounts released and the namespaces deleted, when it closes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import needs
from multihost_engines import (
    ENGINES,
    FRESH,
    NONE,
    SERVICE_ADDRESS,
    STALE,
    Engine,
    Mount,
    command,
    run,
    tool,
)

WORKER = Path(__file__).with_name("multihost_worker.py")
HOSTNAMES = ("alpha", "beta:2", "gamma/3")  # two need escaping in unique names
FRESH_LISTINGS = Mount(FRESH)
STALE_CACHES = Mount(STALE)
NO_CACHES = Mount(NONE)
# sshfs fails within seconds, not hangs, when the server cannot be reached:
# a dead connection is dropped after ServerAliveInterval * ServerAliveCountMax,
# and sshfs's reconnect then finds the route gone (or gives up on
# ConnectTimeout).
SSH_OPTIONS = {
    "BatchMode": "yes",
    "ConnectTimeout": "2",
    "ServerAliveInterval": "1",
    "ServerAliveCountMax": "2",
}

_tags = itertools.count()


def need_hosts(engine: Engine) -> None:
    """Skip (or fail in CI) unless namespaces and the engine can be had."""
    needs.need_root()
    for name in ("ip", "unshare", "nsenter", "umount"):
        needs.need(tool(name) is not None, f"needs {name} (tests/provision.sh installs it)")
    needs.need_device("/dev/fuse")
    engine.need()


@dataclass(frozen=True)
class Host:
    """One host: its hostname, namespace, end of the link and addresses."""

    index: int
    hostname: str
    netns: str
    device: str
    server_device: str
    address: str
    server_address: str


@dataclass(frozen=True)
class Flag:
    """A flag file of the run, as a job's parameter: its path once launched."""

    name: str


@dataclass
class Job:
    """One process on a host: a role of ``multihost_worker.JOBS``.

    ``params`` go to the role as they are, :class:`Flag` values as paths; a
    ``store`` param is ``<mount name>/<path on the export>``.
    """

    role: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """The workers started on the hosts for one part of a test."""

    directory: Path
    agents: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]
    results: dict[str, Path]  # "<hostname> <index> <role>" -> its JSON file
    ready: list[Path] = field(default_factory=list)  # one per host, once mounted
    patience: float = 1.0  # the engine's: every timeout is multiplied by it

    def flag(self, name: str) -> str:
        """The path of a flag file that jobs and the test can raise."""
        return str(self.directory / f"flag-{name}")

    def raise_flag(self, name: str) -> None:
        Path(self.flag(name)).touch()

    def keys(self, role: str) -> list[str]:
        """The keys of the jobs of ``role``."""
        return [key for key in self.results if key.endswith(f" {role}")]

    def done(self, key: str) -> bool:
        return self.results[key].exists()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every host has mounted the server."""
        self._wait(
            lambda: all(path.exists() for path in self.ready),
            timeout,
            "mounting",
        )

    def go(self) -> None:
        self.raise_flag("go")

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for ``condition``; fail if a host fails or time runs out."""
        self._wait(condition, timeout, what)

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        timeout *= self.patience
        deadline = time.monotonic() + timeout
        while not condition():
            failed = {h: a.returncode for h, a in self.agents.items() if a.poll() not in (None, 0)}
            if failed:
                raise AssertionError(f"hosts failed while {what}: {failed}\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s {what}\n{self.log_text()}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> dict[str, dict[str, Any]]:
        """Wait for every host to end; the jobs' results by key."""
        timeout *= self.patience
        deadline = time.monotonic() + timeout
        for hostname, agent in self.agents.items():
            try:
                agent.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"{hostname} still running after {timeout} s\n{self.log_text()}"
                ) from None
        failed = {h: a.returncode for h, a in self.agents.items() if a.returncode != 0}
        if failed:
            raise AssertionError(f"hosts failed: {failed}\n{self.log_text()}")
        results = {}
        for key, path in self.results.items():
            result = json.loads(path.read_text())
            if result.get("timed_out"):
                raise AssertionError(f"{key} ran out of time\n{self.log_text()}")
            results[key] = result
        return results

    def kill(self) -> None:
        for agent in self.agents.values():
            if agent.poll() is None:
                # The agent is pid 1 of its host's PID namespace: its end
                # ends every process below it, sshfs included.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()

    def log_text(self) -> str:
        parts = []
        for hostname, log in self.logs.items():
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- {hostname} ---\n{text[-4000:]}")
        return "\n".join(parts)


class Cluster:
    """A file server and ``count`` hosts; use :func:`cluster` to make one."""

    def __init__(self, root: Path, count: int, engine: Engine) -> None:
        self.root = root
        self.engine = engine
        self.export = root / "export"
        self.export.mkdir()
        tag = f"{os.getpid() % 100000}x{next(_tags)}"
        self.server_netns = f"atomstore-{tag}-server"
        self.hosts = [
            Host(
                index=i,
                hostname=HOSTNAMES[i],
                netns=f"atomstore-{tag}-host{i}",
                device=f"as{tag}h{i}",
                server_device=f"as{tag}s{i}",
                address=f"10.231.{i + 1}.2",
                server_address=f"10.231.{i + 1}.1",
            )
            for i in range(count)
        ]
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._mounts: list[Path] = []
        self._runs = itertools.count()
        self._keys = root / "keys"
        self.view = self.export

    # -- set up ----------------------------------------------------------

    def start(self) -> None:
        self._make_network()
        self.engine.start(self)
        if not self.engine.direct_view:
            self.view = self._mount_observer()

    def _spawn(self, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a session of its own, its output appended to
        ``log``; it is killed when the cluster closes."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self._processes.append(process)
        return process

    def spawn_server(self, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Start a server in the server's namespaces (network, mount, PID).

        Its PID namespace ends whatever it starts when it ends.
        """
        return self._spawn(
            [
                *command("ip", "netns", "exec", self.server_netns),
                *command("unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *argv),
            ],
            log,
        )

    def _mount_observer(self) -> Path:
        """Mount the engine's client, with no caches, where the test sees it."""
        path = self.root / "observer"
        path.mkdir()
        log = self.root / "observer.log"
        argv = self.engine.client(self, None, path, NO_CACHES)
        # Only the network namespace is the server's: the mount is made in
        # the test's own mount namespace.
        process = self._spawn(
            [*command("nsenter", f"--net=/run/netns/{self.server_netns}"), *argv], log
        )
        self._mounts.append(path)
        wait_for_mount(path, process, log)
        return path

    def start_sshd(self) -> None:
        """sshfs's server: an sshd of the test's own, and its keys."""
        self._make_keys()
        self._start_sshd()

    def _make_network(self) -> None:
        for netns in [self.server_netns] + [h.netns for h in self.hosts]:
            run("ip", "netns", "add", netns)
            self._namespaces.append(netns)
            run(*f"ip -n {netns} link set lo up".split())
        server = self.server_netns
        for h in self.hosts:
            run(
                *f"ip link add {h.device} netns {h.netns} type veth"
                f" peer name {h.server_device} netns {server}".split()
            )
            run(*f"ip -n {server} addr add {h.server_address}/24 dev {h.server_device}".split())
            run(*f"ip -n {h.netns} addr add {h.address}/24 dev {h.device}".split())
            run(*f"ip -n {server} link set {h.server_device} up".split())
            run(*f"ip -n {h.netns} link set {h.device} up".split())
            self._route_to_services(h)
        # The address the server's services name themselves by (GlusterFS's
        # brick): every host reaches it through its own link.
        run(*f"ip -n {server} addr add {SERVICE_ADDRESS}/32 dev lo".split())

    def _route_to_services(self, host: Host) -> None:
        via = host.server_address
        run(*f"ip -n {host.netns} route replace {SERVICE_ADDRESS}/32 via {via}".split())

    def _make_keys(self) -> None:
        self._keys.mkdir()
        for key in ("server", "client"):
            path = self._keys / key
            run(
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-C",
                f"atomstore-{key}",
                "-N",
                "",
                "-f",
                str(path),
            )
        (self._keys / "authorized_keys").write_text((self._keys / "client.pub").read_text())
        server_key = " ".join((self._keys / "server.pub").read_text().split()[:2])
        (self._keys / "known_hosts").write_text(
            "".join(f"{h.server_address} {server_key}\n" for h in self.hosts)
        )
        client = {
            "User": "root",
            "IdentityFile": str(self._keys / "client"),
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "UserKnownHostsFile": str(self._keys / "known_hosts"),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "UpdateHostKeys": "no",
            **SSH_OPTIONS,
        }
        self.ssh_config = self.root / "ssh_config"
        self.ssh_config.write_text(
            "Host *\n" + "".join(f"    {k} {v}\n" for k, v in client.items())
        )

    def _start_sshd(self) -> None:
        config = self.root / "sshd_config"
        lines = [f"ListenAddress {h.server_address}" for h in self.hosts] + [
            f"HostKey {self._keys / 'server'}",
            f"AuthorizedKeysFile {self._keys / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the keys live under the world-writable /tmp
            "PidFile none",
            "LogLevel ERROR",
            # A session whose host vanished ends instead of lingering.
            "ClientAliveInterval 1",
            "ClientAliveCountMax 3",
            "Subsystem sftp internal-sftp",
        ]
        config.write_text("\n".join(lines) + "\n")
        sshd = tool("sshd")
        assert sshd is not None
        # sshd insists on its privilege separation directory, /run/sshd;
        # `ip netns exec` gives a mount namespace of our own to make it in.
        script = (
            "mount -t tmpfs -o mode=755 atomstore-sshd /run && mkdir -m 755 /run/sshd && "
            f'exec "{sshd}" -D -e -f "{config}"'
        )
        self.sshd_log = self.root / "sshd.log"
        process = self.spawn_server(["sh", "-c", script], self.sshd_log)
        deadline = time.monotonic() + 10
        while not self._listening(process.pid):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {self.sshd_log.read_text()}")
            time.sleep(0.02)

    def _listening(self, pid: int) -> bool:
        # /proc/PID/net/tcp shows the sockets of PID's network namespace.
        wanted = len(self.hosts)
        try:
            lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
        except OSError:
            return False
        listening = [
            ln for ln in lines if ln.split()[1].endswith(":0016") and ln.split()[3] == "0A"
        ]
        return len(listening) >= wanted

    # -- use -------------------------------------------------------------

    def store_dir(self, name: str = "store") -> Path:
        """The store's directory as the server sees it."""
        return self.view / name

    def set_link(self, host: Host, up: bool) -> None:
        """Take the host's end of its link down, or bring it back."""
        run("ip", "-n", host.netns, "link", "set", host.device, "up" if up else "down")
        if up:  # the route to the server's services went down with the link
            self._route_to_services(host)

    def launch(
        self,
        jobs: dict[Host, Sequence[Job]],
        *,
        mounts: dict[str, Mount] | None = None,
    ) -> Run:
        """Start the hosts' workers: each mounts, then waits for :meth:`Run.go`.

        :param mounts: how each host mounts, by mount name; a job's ``store``
            param is ``<mount name>/<path on the export>``.  By default one
            mount, ``main``, with fresh caches.
        """
        mounts = {"main": FRESH_LISTINGS} if mounts is None else mounts
        directory = self.root / f"run{next(self._runs)}"
        directory.mkdir()
        run = Run(directory, {}, {}, {}, patience=self.engine.patience)
        for host, host_jobs in jobs.items():
            home = directory / host.device
            mount_specs: list[dict[str, Any]] = []
            for name, how in mounts.items():
                path = home / name
                path.mkdir(parents=True)
                mount_specs.append(
                    {
                        "path": str(path),
                        "command": self.engine.client(self, host, path, how),
                        "log": str(directory / f"{host.device}.{name}.log"),
                        "kill": run.flag(f"kill-client-{host.device}"),
                        "pids_from": 10_000 * (host.index + 1) + 1000 * len(mount_specs),
                        "remounted": run.flag(f"remounted-{host.device}"),
                    }
                )
            job_specs = []
            for i, job in enumerate(host_jobs):
                key = f"{host.hostname} {i} {job.role}"
                run.results[key] = directory / f"{host.device}-{i}.json"
                params = {
                    "max_seconds": 120.0 * self.engine.patience,
                    "seed": host.index * 1000 + i,
                    "name": f"{host.hostname}#{i}",
                    **job.params,
                }
                for param, value in params.items():
                    if isinstance(value, Flag):
                        params[param] = run.flag(value.name)
                mount_name, _, inside = params.pop("store", "main/store").partition("/")
                job_specs.append(
                    {
                        **params,
                        "role": job.role,
                        "store": str(home / mount_name / inside),
                        "result": str(run.results[key]),
                    }
                )
            run.ready.append(directory / f"ready-{host.device}")
            spec_path = directory / f"{host.device}.json"
            spec_path.write_text(
                json.dumps(
                    {
                        "hostname": host.hostname,
                        "jobs": job_specs,
                        "mounts": mount_specs,
                        "go": run.flag("go"),
                        "ready": str(directory / f"ready-{host.device}"),
                    }
                )
            )
            log = directory / f"{host.device}.log"
            run.logs[host.hostname] = log
            run.agents[host.hostname] = self._spawn(
                [
                    *command("ip", "netns", "exec", host.netns),
                    *command("unshare", "--uts", "--pid", "--fork", "--mount-proc"),
                    *("--kill-child", sys.executable, str(WORKER), str(spec_path)),
                ],
                log,
            )
        return run

    # -- tear down -------------------------------------------------------

    def close(self) -> None:
        """Kill what the cluster started, then delete its namespaces."""
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        for netns in self._namespaces:
            # Whatever still runs inside: a safety net, as every process
            # the cluster starts ends with the pid 1 of its namespace.
            pids = subprocess.run(
                command("ip", "netns", "pids", netns), capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for process in self._processes:
            process.wait()
        for path in self._mounts:
            # A FUSE mount whose server was killed stays until unmounted.
            subprocess.run(command("umount", "-l", str(path)), capture_output=True, check=False)
        for netns in reversed(self._namespaces):
            subprocess.run(command("ip", "netns", "del", netns), capture_output=True, check=False)
        self._namespaces.clear()


def wait_for_mount(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not os.path.ismount(path):
        if process.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"mounting {path} failed (exit {process.poll()}):\n{text}")
        time.sleep(0.02)


@contextlib.contextmanager
def cluster(root: Path, count: int, engine: str = "sshfs") -> Iterator[Cluster]:
    """A running file server and ``count`` hosts, torn down on exit."""
    chosen = ENGINES[engine]
    need_hosts(chosen)
    made = Cluster(root, count, chosen)
    try:
        made.start()
        yield made
    finally:
        made.close()
