"""Mounting real filesystems for the tests, and always releasing them.

Each helper is a context manager that mounts, yields the mount point, and
unmounts in a ``finally`` (lazily if the filesystem is still busy); loop
devices and images are released too.  :func:`private_mount_namespace` puts
the whole process in a mount namespace of its own meanwhile, so the mounts
are invisible to the rest of the machine and disappear with the namespace
even if the process dies before it can unmount.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# sched.h and sys/mount.h
_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18

LOOP_SIZES_MIB = {"ext4": 64, "xfs": 300, "btrfs": 128}  # xfs refuses < 300 MiB
MKFS = {
    "ext4": ("mkfs.ext4", "-q", "-F"),
    "xfs": ("mkfs.xfs", "-q", "-f"),
    "btrfs": ("mkfs.btrfs", "-q", "-f"),
}
FUSE_PASSTHROUGH = Path(__file__).with_name("fuse_passthrough.py")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def run(*command: str | os.PathLike[str]) -> str:
    """Run ``command``; its standard error becomes the exception's message."""
    args = [os.fspath(a) for a in command]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def kernel_has(fstype: str) -> bool:
    """Whether the running kernel knows the filesystem type ``fstype``.

    A module not loaded yet is not listed in /proc/filesystems: modprobe
    loads it, as mount(8) would.
    """
    if _listed(fstype):
        return True
    with contextlib.suppress(OSError):
        subprocess.run(["modprobe", "-q", fstype], capture_output=True, check=False)
    return _listed(fstype)


def _listed(fstype: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


@contextlib.contextmanager
def private_mount_namespace() -> Iterator[bool]:
    """Run this thread in a mount namespace of its own until the block ends.

    Namespaces belong to threads: the calling thread moves, and so do the
    processes it starts.  Yields True there, or False where unshare(2) is
    refused (no CAP_SYS_ADMIN, a seccomp filter): the mounts are then made
    in the machine's namespace, and the helpers below still unmount them.
    Mount propagation is made private first, or the mounts would propagate
    back to a shared ``/``.  Going back fails if a thread started meanwhile
    still shares the working directory (setns(2), EINVAL).
    """
    cwd = os.getcwd()
    original = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        except OSError:
            yield False
            return
        try:
            private = _libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None)
            _check(private, "mount --make-rprivate /")
            yield True
        finally:
            # Joining a mount namespace moves the root and the working
            # directory to its root (setns(2)).
            _check(_libc.setns(original, _CLONE_NEWNS), "setns back to the original namespace")
            os.chdir(cwd)
    finally:
        os.close(original)


def is_mounted(mountpoint: Path) -> bool:
    target = os.fsencode(os.path.realpath(mountpoint))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def unmount(mountpoint: Path) -> None:
    """Unmount ``mountpoint``; lazily if it is busy, so it never stays."""
    if not is_mounted(mountpoint):
        return
    try:
        run("umount", mountpoint)
    except RuntimeError:
        run("umount", "--lazy", mountpoint)


@contextlib.contextmanager
def mounted(mountpoint: Path, *options: str | os.PathLike[str]) -> Iterator[Path]:
    """``mount OPTIONS... MOUNTPOINT``, unmounted when the block ends."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", *options, mountpoint)
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size_mib: int = 64) -> Iterator[Path]:
    with mounted(mountpoint, "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs") as path:
        yield path


@contextlib.contextmanager
def loop_filesystem(fstype: str, workdir: Path) -> Iterator[Path]:
    """A fresh ``fstype`` (ext4, xfs, btrfs) in a sparse image, loop-mounted."""
    image = workdir / f"{fstype}.img"
    with open(image, "wb") as f:
        f.truncate(LOOP_SIZES_MIB[fstype] << 20)
    try:
        run(*MKFS[fstype], image)
        # mount -o loop sets the loop device to detach itself when the
        # filesystem is unmounted, even by the death of the namespace.
        with mounted(workdir / fstype, "-o", "loop", image) as path:
            yield path
    finally:
        _detach_loops(image)
        image.unlink()


def _detach_loops(image: Path) -> None:
    """Detach any loop device still attached to ``image``."""
    for _ in range(50):
        attached = [line.split(":")[0] for line in run("losetup", "-j", image).splitlines()]
        if not attached:
            return
        for device in attached:
            with contextlib.suppress(RuntimeError):  # detached meanwhile
                run("losetup", "-d", device)
        time.sleep(0.02)
    raise RuntimeError(f"loop devices of {image} stay attached: {attached}")


@contextlib.contextmanager
def overlay(layers: Path, lower: Path) -> Iterator[Path]:
    """An overlayfs over the directory ``lower``, with its upper layer in ``layers``.

    redirect_dir=off pins what the kernel's default (CONFIG_OVERLAY_FS_
    REDIRECT_DIR) may change: a directory of the lower layer cannot be
    renamed (EXDEV), the case atomstore's fallbacks must handle.
    """
    upper, work = layers / "upper", layers / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off"
    with mounted(layers / "merged", "-t", "overlay", "-o", options, "overlay") as path:
        yield path


@contextlib.contextmanager
def fuse_passthrough(
    mode: str, source: Path, mountpoint: Path, log: Path | None = None
) -> Iterator[Path]:
    """Mount ``source`` at ``mountpoint`` through tests/fuse_passthrough.py.

    ``mode`` says what it does with rename flags (honour, einval, enosys,
    drop); ``log`` gets one line per flagged rename that reached it.  The
    process is stopped and the mount removed when the block ends; what it
    said on standard error stays in ``MOUNTPOINT.stderr``.
    """
    source.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    errors = mountpoint.with_name(mountpoint.name + ".stderr")
    command = [sys.executable, str(FUSE_PASSTHROUGH), mode, str(source), str(mountpoint)]
    if log is not None:
        command.append(str(log))
    with open(errors, "wb") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_until_mounted(mountpoint, process, errors)
        yield mountpoint
    finally:
        try:
            unmount(mountpoint)
        finally:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_mounted(mountpoint: Path, process: subprocess.Popen[bytes], errors: Path) -> None:
    deadline = time.monotonic() + 15
    while not is_mounted(mountpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"the FUSE passthrough did not mount {mountpoint} "
                f"(exit {process.poll()}): {errors.read_text(errors='replace').strip()}"
            )
        time.sleep(0.02)
