"""Several hosts sharing one store through sshfs: the harness of the tests.

A *file server* network namespace runs an sshd of its own (its config, host
key and authorized key generated under the test's directory; it listens only
on the server's private addresses).  Each *host* is a network namespace
linked to the server by a veth pair on a /24 of its own (10.231.<i>.0/24:
the server is .1, the host .2).  A host runs ``multihost_worker.py`` in UTS
and PID namespaces of its own: its own hostname, and pids that start at 1,
so two hosts' processes have the same pids, as containers do.  The worker
mounts the server's export with sshfs and runs the jobs below its mount.

The server's export is a directory on this machine, so the test reads what
is "on the server" directly.  Everything the cluster starts runs in its
namespaces and is killed, and the namespaces deleted, when it closes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import needs

WORKER = Path(__file__).with_name("multihost_worker.py")
HOSTNAMES = ("alpha", "beta:2", "gamma/3")  # two need escaping in unique names
_SBIN = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))

# Fail within seconds, not hang, when the server cannot be reached: a dead
# connection is dropped after ServerAliveInterval * ServerAliveCountMax, and
# sshfs's reconnect then finds the route gone (or gives up on ConnectTimeout).
SSH_OPTIONS = {
    "BatchMode": "yes",
    "ConnectTimeout": "2",
    "ServerAliveInterval": "1",
    "ServerAliveCountMax": "2",
}
# sshfs's own caches are left on (they are what a user gets), but its
# directory cache would hide another host's new messages for 20 s.
FRESH_LISTINGS = ("reconnect", "dir_cache=no")
# Everything cached for a minute: stale listings, stale names, stale
# attributes.  Only the server's rename may decide who owns a message.
STALE_CACHES = (
    "reconnect",
    "dir_cache=yes",
    "dcache_timeout=60",
    "entry_timeout=60",
    "attr_timeout=60",
    "negative_timeout=60",
)

_tags = itertools.count()


def tool(name: str) -> str | None:
    """The path of a system tool, looking in the sbin directories too."""
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + _SBIN)


def need_hosts() -> None:
    """Skip (or fail in CI) unless namespaces, sshd and sshfs can be had."""
    needs.need_root()
    for name in ("ip", "unshare", "sshd", "ssh", "ssh-keygen", "sshfs", "umount"):
        needs.need(tool(name) is not None, f"needs {name} (tests/provision.sh installs it)")
    needs.need_device("/dev/fuse")


def _command(name: str, *args: str) -> list[str]:
    """A command line with the tool's full path: sbin may be off the PATH."""
    return [tool(name) or name, *args]


def _run(*command: str) -> str:
    done = subprocess.run(_command(*command), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


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

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
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
        self._runs = itertools.count()
        self._keys = root / "keys"

    # -- set up ----------------------------------------------------------

    def start(self) -> None:
        self._make_network()
        self._make_keys()
        self._start_sshd()

    def _make_network(self) -> None:
        for netns in [self.server_netns] + [h.netns for h in self.hosts]:
            _run("ip", "netns", "add", netns)
            self._namespaces.append(netns)
            _run(*f"ip -n {netns} link set lo up".split())
        server = self.server_netns
        for h in self.hosts:
            _run(
                *f"ip link add {h.device} netns {h.netns} type veth"
                f" peer name {h.server_device} netns {server}".split()
            )
            _run(*f"ip -n {server} addr add {h.server_address}/24 dev {h.server_device}".split())
            _run(*f"ip -n {h.netns} addr add {h.address}/24 dev {h.device}".split())
            _run(*f"ip -n {server} link set {h.server_device} up".split())
            _run(*f"ip -n {h.netns} link set {h.device} up".split())

    def _make_keys(self) -> None:
        self._keys.mkdir()
        for key in ("server", "client"):
            path = self._keys / key
            _run(
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
        with open(self.sshd_log, "wb") as log:
            process = subprocess.Popen(
                [
                    *_command("ip", "netns", "exec", self.server_netns),
                    # A PID namespace of its own reaps (and ends) sshd's sessions.
                    *_command("unshare", "--pid", "--fork", "--kill-child", "sh", "-c", script),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._processes.append(process)
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
        return self.export / name

    def set_link(self, host: Host, up: bool) -> None:
        """Take the host's end of its link down, or bring it back."""
        _run("ip", "-n", host.netns, "link", "set", host.device, "up" if up else "down")

    def launch(
        self,
        jobs: dict[Host, Sequence[Job]],
        *,
        mounts: dict[str, Sequence[str]] | None = None,
    ) -> Run:
        """Start the hosts' workers: each mounts, then waits for :meth:`Run.go`.

        :param mounts: sshfs options by mount name; a job's ``store`` param is
            ``<mount name>/<path on the export>``.  By default one mount,
            ``main``, with fresh listings.
        """
        mounts = {"main": FRESH_LISTINGS} if mounts is None else mounts
        directory = self.root / f"run{next(self._runs)}"
        directory.mkdir()
        run = Run(directory, {}, {}, {})
        for host, host_jobs in jobs.items():
            home = directory / host.device
            mount_specs = []
            for name, options in mounts.items():
                (home / name).mkdir(parents=True)
                mount_specs.append(
                    {
                        "path": str(home / name),
                        "remote": f"{host.server_address}:{self.export}",
                        "options": list(options),
                        "ssh_config": str(self.ssh_config),
                        "sshfs": tool("sshfs") or "sshfs",
                        "log": str(directory / f"{host.device}.sshfs.log"),
                    }
                )
            job_specs = []
            for i, job in enumerate(host_jobs):
                key = f"{host.hostname} {i} {job.role}"
                run.results[key] = directory / f"{host.device}-{i}.json"
                params = {
                    "max_seconds": 120.0,
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
            with open(log, "wb") as out:
                agent = subprocess.Popen(
                    [
                        *_command("ip", "netns", "exec", host.netns),
                        *_command("unshare", "--uts", "--pid", "--fork", "--mount-proc"),
                        *("--kill-child", sys.executable, str(WORKER), str(spec_path)),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            self._processes.append(agent)
            run.agents[host.hostname] = agent
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
                _command("ip", "netns", "pids", netns), capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for process in self._processes:
            process.wait()
        for netns in reversed(self._namespaces):
            subprocess.run(_command("ip", "netns", "del", netns), capture_output=True, check=False)
        self._namespaces.clear()


@contextlib.contextmanager
def cluster(root: Path, count: int) -> Iterator[Cluster]:
    """A running file server and ``count`` hosts, torn down on exit."""
    need_hosts()
    made = Cluster(root, count)
    try:
        made.start()
        yield made
    finally:
        made.close()
