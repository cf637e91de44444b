"""The network filesystems the multi-host tests run on, one class each.

An engine starts its servers in the cluster's server namespace, and gives
the command line of a client that mounts the shared filesystem in the
foreground: on a host (from the host's namespaces), or as the test's own
*observer* (from the server's network namespace, in the test's mount
namespace, so that the test reads what is on the server through it).

A host's client comes in two cache modes:

``fresh``
    the engine's own defaults, as a user mounts it (listings not cached:
    another host's new message shows within a second);
``stale``
    everything cached for a minute: stale listings, stale names, stale
    attributes.  Only the server's rename may decide who owns a message.

The observer mounts with ``none``: no attribute, entry or listing caches,
so that the test sees what the server holds.

A :class:`Mount` names the mode and any options of the engine's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import needs

if TYPE_CHECKING:
    from multihost import Cluster, Host

SERVICE_ADDRESS = "10.231.0.1"  # the server's own address, on its loopback

_SBIN = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))
FRESH = "fresh"
STALE = "stale"
NONE = "none"


def tool(name: str) -> str | None:
    """The path of a system tool: the sbin directories and this Python's too."""
    path = os.pathsep.join((os.environ.get("PATH", ""), _SBIN, os.path.dirname(sys.executable)))
    return shutil.which(name, path=path)


def command(name: str, *args: str) -> list[str]:
    """A command line with the tool's full path: sbin may be off the PATH."""
    return [tool(name) or name, *args]


def run(*argv: str, timeout: float = 60.0) -> str:
    done = subprocess.run(
        command(*argv), capture_output=True, text=True, check=False, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def wait_for(
    condition: object,
    what: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 30.0,
) -> None:
    """Wait for ``condition()``; fail if ``process`` ends first."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} failed (exit {process.poll()}):\n{text}")
        time.sleep(0.02)


def client_file(cluster: Cluster, host: Host | None, path: Path, what: str) -> Path:
    """A file or directory of one client's own (its log, cache, socket),
    named by its host (or the observer) and its mount."""
    label = "observer" if host is None else host.device
    return cluster.root / f"{what}-{label}-{path.name}"


@dataclass(frozen=True)
class Mount:
    """How a client mounts: its cache mode and options of the engine's own."""

    caches: str = FRESH
    options: Sequence[str] = ()


class Engine:
    """A network filesystem: its servers and its clients."""

    name = ""
    #: the tools it needs (tests/provision.sh installs them)
    tools: tuple[str, ...] = ()
    #: True: the test reads the store from the server's own directory
    #: (``Cluster.export``) instead of an observer's mount
    direct_view = False
    #: how long a host's link is down in the fault tests: longer than a
    #: call on a dead link takes to fail, with the timeouts the README
    #: recommends (this engine's options here)
    outage = 10.0
    #: a call on a dead link waits for the link to come back instead of
    #: failing (the engine retries through an outage)
    holds_calls = False
    #: the messages the exchange test sends, and the seconds it allows
    #: (times ``patience``)
    exchange = (10_000, 300.0)
    #: how many times longer than the others its runs may take
    patience = 1.0
    #: how long the other hosts' calls may wait for what a killed client
    #: held (its locks or capabilities), until the server gives up on it
    killed_client_holds = 0.0

    def need(self) -> None:
        for name in self.tools:
            needs.need(tool(name) is not None, f"needs {name} (tests/provision.sh installs it)")

    def start(self, cluster: Cluster) -> None:
        """Start the servers in ``cluster.server_netns``."""

    def client(self, cluster: Cluster, host: Host | None, path: Path, mount: Mount) -> list[str]:
        """The command that mounts the filesystem at ``path`` in the foreground.

        ``host`` None is the observer, in the server's network namespace.
        """
        raise NotImplementedError


class Sshfs(Engine):
    """An SSH server's directory, mounted with sshfs (SFTP)."""

    name = "sshfs"
    tools = ("sshd", "ssh", "ssh-keygen", "sshfs")
    direct_view = True
    outage = 4.0  # ServerAliveInterval * ServerAliveCountMax is 2 s
    # multihost.SSH_OPTIONS make a dead link fail within seconds.
    OPTIONS = ("reconnect",)
    CACHES: ClassVar[dict[str, tuple[str, ...]]] = {
        # sshfs's own caches are left on (they are what a user gets), but
        # its directory cache would hide another host's new messages for 20 s.
        FRESH: ("dir_cache=no",),
        NONE: ("dir_cache=no", "cache=no"),
        STALE: (
            "dir_cache=yes",
            "dcache_timeout=60",
            "entry_timeout=60",
            "attr_timeout=60",
            "negative_timeout=60",
        ),
    }

    def start(self, cluster: Cluster) -> None:
        cluster.start_sshd()

    def client(self, cluster: Cluster, host: Host | None, path: Path, mount: Mount) -> list[str]:
        assert host is not None, "the test reads the export itself"
        argv = command("sshfs", "-f", "-F", str(cluster.ssh_config))
        argv.append(f"{host.server_address}:{cluster.export}")
        argv.append(str(path))
        for option in (*self.OPTIONS, *self.CACHES[mount.caches], *mount.options):
            argv += ["-o", option]
        return argv


class Gluster(Engine):
    """A GlusterFS volume of one brick, served by glusterd; FUSE clients.

    glusterd keeps its state in a working directory of the test's, and its
    sockets and logs on bind mounts over ``/run`` and ``/var/log/glusterfs``
    in a mount namespace of its own.
    """

    name = "glusterfs"
    tools = ("glusterd", "gluster", "glusterfs")
    # network.ping-timeout: a client that hears nothing from the brick for
    # this many seconds drops it, and its calls fail with ENOTCONN.
    PING_TIMEOUT = 2
    outage = PING_TIMEOUT + 3.0
    VOLUME = "atomstore"
    CACHES: ClassVar[dict[str, tuple[str, ...]]] = {
        FRESH: (),
        NONE: (
            "--attribute-timeout=0",
            "--entry-timeout=0",
            "--negative-timeout=0",
            f"--xlator-option={VOLUME}-md-cache.md-cache-timeout=0",
        ),
        STALE: (
            "--attribute-timeout=60",
            "--entry-timeout=60",
            "--negative-timeout=60",
            f"--xlator-option={VOLUME}-md-cache.md-cache-timeout=60",
        ),
    }

    def start(self, cluster: Cluster) -> None:
        state = cluster.root / "glusterd"
        for sub in ("work", "run", "log"):
            (state / sub).mkdir(parents=True)
        conf = Path("/etc/glusterfs/glusterd.vol").read_text()
        (state / "glusterd.vol").write_text(conf.replace("/var/lib/glusterd", str(state / "work")))
        brick = f"{SERVICE_ADDRESS}:{cluster.export}"
        gluster = tool("gluster")
        script = f"""
            set -e
            mount --bind "{state}/run" /run
            mkdir -p /run/gluster /var/log/glusterfs
            mount --bind "{state}/log" /var/log/glusterfs
            "{tool("glusterd")}" -N -f "{state}/glusterd.vol" &
            until "{gluster}" volume list >/dev/null 2>&1; do sleep 0.05; done
            "{gluster}" --mode=script volume create {self.VOLUME} {brick} force
            "{gluster}" --mode=script volume set {self.VOLUME} \
                network.ping-timeout {self.PING_TIMEOUT}
            "{gluster}" --mode=script volume start {self.VOLUME}
            touch "{state}/started"
            wait
        """
        log = cluster.root / "glusterd.log"
        process = cluster.spawn_server(["sh", "-c", script], log)
        wait_for((state / "started").exists, "starting glusterd", process, log)

    def client(self, cluster: Cluster, host: Host | None, path: Path, mount: Mount) -> list[str]:
        return command(
            "glusterfs",
            "-N",
            f"--volfile-server={SERVICE_ADDRESS}",
            f"--volfile-id={self.VOLUME}",
            f"--log-file={client_file(cluster, host, path, 'glusterfs')}.log",
            *self.CACHES[mount.caches],
            *mount.options,
            str(path),
        )


class JuiceFS(Engine):
    """A JuiceFS volume whose metadata and data both live in one Redis.

    Every byte a client reads or writes crosses the network: the object
    store is Redis too, not a directory all hosts could see.
    """

    name = "juicefs"
    tools = ("redis-server", "juicefs")
    PORT = 6379
    # go-redis's timeouts; JuiceFS retries a metadata call that meets them,
    # with a growing back-off, for up to about a minute before it fails: a
    # call on a dead link waits for it.
    REDIS_TIMEOUTS = "dial_timeout=1s&read_timeout=1s&write_timeout=1s"
    outage = 5.0
    holds_calls = True
    CACHES: ClassVar[dict[str, tuple[str, ...]]] = {
        FRESH: (),
        NONE: ("--attr-cache=0", "--entry-cache=0", "--dir-entry-cache=0"),
        STALE: ("--attr-cache=60", "--entry-cache=60", "--dir-entry-cache=60"),
    }

    def meta_url(self, address: str) -> str:
        return f"redis://{address}:{self.PORT}/1?{self.REDIS_TIMEOUTS}"

    def start(self, cluster: Cluster) -> None:
        data = cluster.root / "redis"
        data.mkdir()
        addresses = ["127.0.0.1", SERVICE_ADDRESS]
        log = cluster.root / "redis.log"
        process = cluster.spawn_server(
            command(
                "redis-server",
                "--bind",
                *addresses,
                "--port",
                str(self.PORT),
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data),
            ),
            log,
        )

        def answers() -> bool:
            done = subprocess.run(
                command("ip", "netns", "exec", cluster.server_netns, "redis-cli", "ping"),
                capture_output=True,
                text=True,
                check=False,
            )
            return done.stdout.strip() == "PONG"

        wait_for(answers, "starting redis-server", process, log)
        run(
            "ip",
            "netns",
            "exec",
            cluster.server_netns,
            tool("juicefs") or "juicefs",
            "format",
            "--trash-days=0",
            "--storage",
            "redis",
            "--bucket",
            f"redis://{SERVICE_ADDRESS}:{self.PORT}/2",
            self.meta_url(SERVICE_ADDRESS),
            "atomstore",
        )

    def client(self, cluster: Cluster, host: Host | None, path: Path, mount: Mount) -> list[str]:
        cache = client_file(cluster, host, path, "juicefs-cache")
        return command(
            "juicefs",
            "mount",
            "--no-usage-report",
            "--no-syslog",
            "--backup-meta=0",
            f"--cache-dir={cache}",
            *self.CACHES[mount.caches],
            *mount.options,
            self.meta_url(SERVICE_ADDRESS),
            str(path),
        )


class MooseFS(Engine):
    """A MooseFS master and one chunkserver, mfsmount clients."""

    name = "moosefs"
    tools = ("mfsmaster", "mfschunkserver", "mfsmount")
    EMPTY_METADATA = Path("/var/lib/mfs/metadata.mfs.empty")
    # mfstimeout: a call the master does not answer within this many
    # seconds fails with EIO instead of waiting (the default, 0, waits).
    TIMEOUT = 3
    outage = TIMEOUT + 3.0
    CACHES: ClassVar[dict[str, tuple[str, ...]]] = {
        FRESH: (),
        NONE: (
            "mfsattrcacheto=0",
            "mfsentrycacheto=0",
            "mfsdirentrycacheto=0",
            "mfsnegentrycacheto=0",
        ),
        STALE: (
            "mfsattrcacheto=60",
            "mfsentrycacheto=60",
            "mfsdirentrycacheto=60",
            "mfsnegentrycacheto=60",
        ),
    }

    def start(self, cluster: Cluster) -> None:
        state = cluster.root / "moosefs"
        for sub in ("master", "chunks", "hdd"):
            (state / sub).mkdir(parents=True)
        shutil.copy(self.EMPTY_METADATA, state / "master" / "metadata.mfs")
        (state / "mfsexports.cfg").write_text("*\t/\trw,alldirs,maproot=0:0\n")
        (state / "mfsmaster.cfg").write_text(
            "WORKING_USER = root\nWORKING_GROUP = root\n"
            f"DATA_PATH = {state / 'master'}\nEXPORTS_FILENAME = {state / 'mfsexports.cfg'}\n"
        )
        (state / "mfshdd.cfg").write_text(f"{state / 'hdd'}\n")
        (state / "mfschunkserver.cfg").write_text(
            "WORKING_USER = root\nWORKING_GROUP = root\n"
            f"DATA_PATH = {state / 'chunks'}\nHDD_CONF_FILENAME = {state / 'mfshdd.cfg'}\n"
            f"MASTER_HOST = {SERVICE_ADDRESS}\nMASTER_RECONNECTION_DELAY = 1\n"
        )
        script = f"""
            set -e
            "{tool("mfsmaster")}" -f -c "{state}/mfsmaster.cfg" start &
            "{tool("mfschunkserver")}" -f -c "{state}/mfschunkserver.cfg" start &
            wait
        """
        log = cluster.root / "moosefs.log"
        process = cluster.spawn_server(["sh", "-c", script], log)

        def serving() -> bool:
            # The chunkserver has registered with the master.
            return "connected to Master" in log.read_text(errors="replace")

        wait_for(serving, "starting MooseFS", process, log)

    def client(self, cluster: Cluster, host: Host | None, path: Path, mount: Mount) -> list[str]:
        options = (f"mfstimeout={self.TIMEOUT}", *self.CACHES[mount.caches], *mount.options)
        return command("mfsmount", "-f", "-H", SERVICE_ADDRESS, "-o", ",".join(options), str(path))


class CephFS(Engine):
    """A one-node Ceph cluster (monitor, memstore OSD, MDS); ceph-fuse clients.

    CephFS keeps clients coherent with capabilities the MDS hands out, so
    there is no stale mode to ask for: ``stale`` mounts as ``fresh`` does.
    """

    name = "cephfs"
    tools = ("monmaptool", "ceph-mon", "ceph-mgr", "ceph-osd", "ceph-mds", "ceph", "ceph-fuse")
    # The MDS takes back the capabilities of a client it has not heard from
    # for this long (its least): the other hosts wait for what a killed
    # client held until then.
    SESSION_TIMEOUT = 30
    outage = 5.0
    holds_calls = True
    # Two clients in one directory pass its capabilities back and forth
    # through the MDS: a few dozen messages a second.
    exchange = (2_000, 120.0)
    patience = 5.0
    killed_client_holds = float(SESSION_TIMEOUT)

    def conf(self, cluster: Cluster) -> Path:
        return cluster.root / "ceph" / "ceph.conf"

    STARTS = 3

    def start(self, cluster: Cluster) -> None:
        # Now and then an OSD started under load sends its first command
        # with an empty fsid, is refused, and never comes up: start anew.
        for attempt in range(1, self.STARTS + 1):
            process, log = self._start(cluster, cluster.root / "ceph" / f"try{attempt}")
            try:
                wait_for(self._started(cluster).exists, "starting Ceph", process, log, 120)
                return
            except RuntimeError:
                if attempt == self.STARTS:
                    raise
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def _started(self, cluster: Cluster) -> Path:
        return self.conf(cluster).with_name("started")

    def _start(self, cluster: Cluster, state: Path) -> tuple[subprocess.Popen[bytes], Path]:
        for sub in ("run", "log", "mon-a", "mgr-a", "osd-0", "mds-a"):
            (state / sub).mkdir(parents=True)
        fsid, osd_uuid = uuid.uuid4(), uuid.uuid4()
        conf = self.conf(cluster)
        conf.write_text(
            f"""[global]
fsid = {fsid}
mon host = {SERVICE_ADDRESS}
auth cluster required = none
auth service required = none
auth client required = none
run dir = {state}/run
log file = {state}/log/$name.$pid.log
admin socket = {state}/run/$name.$pid.asok
pid file =
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 1073741824
mon data = {state}/mon-$id
osd data = {state}/osd-$id
mds data = {state}/mds-$id
mgr data = {state}/mgr-$id
"""
        )
        ceph = f'"{tool("ceph")}" -c "{conf}"'
        script = f"""
            set -e
            # Wait up to 30 s for a condition; fail the start if it never holds.
            within() {{
                n=0
                until "$@"; do
                    n=$((n + 1)); [ $n -lt 150 ] || exit 1; sleep 0.2
                done
            }}
            "{tool("monmaptool")}" --create --fsid {fsid} --add a {SERVICE_ADDRESS} \
                "{state}/monmap" >/dev/null
            "{tool("ceph-mon")}" -c "{conf}" --mkfs -i a --monmap "{state}/monmap"
            "{tool("ceph-mon")}" -c "{conf}" -f -i a &
            # The manager reports the placement groups' states.
            "{tool("ceph-mgr")}" -c "{conf}" -f -i a &
            osd=$({ceph} osd new {osd_uuid})
            "{tool("ceph-osd")}" -c "{conf}" -i $osd --mkfs --osd-uuid {osd_uuid}
            "{tool("ceph-osd")}" -c "{conf}" -f -i $osd &
            within sh -c '{ceph} osd stat | grep -q "1 up"'
            {ceph} osd pool create cephfs_meta 8 >/dev/null
            {ceph} osd pool create cephfs_data 8 >/dev/null
            # The MDS writes its first objects at once: wait for the PGs.
            within sh -c '{ceph} pg stat | grep -qE "^([0-9]+) pgs: \\1 active\\+clean;"'
            {ceph} fs new cephfs cephfs_meta cephfs_data >/dev/null
            {ceph} fs set cephfs session_timeout {self.SESSION_TIMEOUT}
            {ceph} fs set cephfs session_autoclose {self.SESSION_TIMEOUT + 5}
            "{tool("ceph-mds")}" -c "{conf}" -f -i a &
            within sh -c '{ceph} mds stat | grep -q "up:active"'
            touch "{self._started(cluster)}"
            wait
        """
        log = cluster.root / "ceph.log"
        return cluster.spawn_server(["sh", "-c", script], log), log

    def client(self, cluster: Cluster, host: Host | None, path: Path, mount: Mount) -> list[str]:
        return command("ceph-fuse", "-f", "-c", str(self.conf(cluster)), *mount.options, str(path))


class SeaweedFS(Engine):
    """A SeaweedFS master, volume server and filer in one ``weed server``;
    ``weed mount`` clients."""

    name = "seaweedfs"
    tools = ("weed",)
    FILER = 8888
    # weed mount retries a call the filer does not answer: it waits through
    # an outage.
    outage = 5.0
    holds_calls = True
    CACHES: ClassVar[dict[str, tuple[str, ...]]] = {
        FRESH: (),
        NONE: ("-cacheMetaTtlSec=0",),
        STALE: ("-cacheMetaTtlSec=60",),
    }

    def start(self, cluster: Cluster) -> None:
        state = cluster.root / "seaweedfs"
        state.mkdir()
        log = cluster.root / "seaweedfs.log"
        process = cluster.spawn_server(
            command(
                "weed",
                "server",
                f"-dir={state}",
                f"-ip={SERVICE_ADDRESS}",
                "-ip.bind=0.0.0.0",
                "-filer",
                f"-filer.port={self.FILER}",
                f"-filer.localSocket={state / 'filer.sock'}",
                "-master.volumeSizeLimitMB=64",
                "-volume.max=20",
            ),
            log,
        )

        def serving() -> bool:
            # The filer runs, and the volume server has joined the master.
            text = log.read_text(errors="replace")
            return "Start Seaweed Filer" in text and "found new uuid" in text

        wait_for(serving, "starting SeaweedFS", process, log, timeout=60)

    def client(self, cluster: Cluster, host: Host | None, path: Path, mount: Mount) -> list[str]:
        cache = client_file(cluster, host, path, "seaweedfs-cache")
        return command(
            "weed",
            "mount",
            f"-filer={SERVICE_ADDRESS}:{self.FILER}",
            f"-dir={path}",
            f"-cacheDir={cache}",
            f"-localSocket={client_file(cluster, host, path, 'weed')}.sock",
            *self.CACHES[mount.caches],
            *mount.options,
        )


ENGINES: dict[str, Engine] = {
    e.name: e for e in (Sshfs(), Gluster(), JuiceFS(), MooseFS(), CephFS(), SeaweedFS())
}
