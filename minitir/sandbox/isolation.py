"""Linux isolation of model-written code, set up once per fork server and entered by each run.

  namespaces  the fork server enters new network and mount namespaces: as root directly, as a normal user
              together with a new user namespace (where the kernel allows unprivileged ones). The network
              namespace has no interface up, so no run reaches any network, loopback included.
  view        a private root for the runs: a read-only tmpfs holding read-only bind mounts of what Python
              needs (the system's /usr and /lib, the interpreter's prefix, its standard library and
              site-packages, found from sys.prefix, sys.base_prefix and sys.path), /dev/null and friends, a
              fresh /tmp and /sandbox, where each run gets a writable, size-limited working directory.
              Nothing else of the host is there: no project, no data, no /etc/shadow, no /proc, and of a
              home (or /root) only those Python directories, read-only, where they lie under it (a pyenv,
              a user's site-packages). A run chroots into the view before it reads its code.
  processes   each run is PID 1 of a PID namespace of its own: it sees and can signal no other process
              (not the trainer, not the fork server, not the user's shell), and when it ends the kernel
              kills whatever it started.
  IPC         each run has an IPC namespace of its own: System V shared memory, semaphores and message
              queues and POSIX message queues are private to it, and its System V objects are removed
              before it is reported done (the kernel frees a namespace lazily: objects left to it would
              outlive the run and escape its memory budget).
  privileges  as root a run becomes a uid of its own; as a user it keeps the user's uid. Either way it
              ends with no capability at all and no_new_privs, so nothing gives it one back.
  landlock,   every run, with or without the namespaces, also confines itself with Landlock (landlock.py:
  seccomp     read Python's directories, write its own, no ptrace beyond itself; where the kernel's ABI has
              them no TCP (ABI 4), no signals or abstract sockets beyond itself (ABI 6)) and a seccomp filter
              (seccomp.py: dangerous system calls fail with EPERM).
In a container whose seccomp profile refuses namespaces (Docker's and Kubernetes' defaults), Landlock and
seccomp are the isolation (mode "landlock"). Where neither namespaces nor Landlock can be had, `setup` says
so and pool.Sandbox refuses to run code unless told to accept the risk.
"""
from __future__ import annotations

import ctypes
import os
import re
import stat
import sys
from dataclasses import dataclass

from minitir.sandbox import landlock, seccomp

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
CLONE_NEWIPC = 0x08000000
IPC_RMID, SHM_INFO, SHM_STAT, MSG_INFO, MSG_STAT, SEM_INFO, SEM_STAT = 0, 14, 13, 12, 11, 19, 18
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MNT_DETACH = 1, 2, 4, 8, 32, 2
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYSTEM_DIRS = ("usr", "lib", "lib64", "lib32", "libx32", "bin", "sbin")
DEVICES = ("null", "zero", "random", "urandom")
ETC_FILES = ("ld.so.cache", "localtime")
TMP_SIZE, WORK_SIZE = "64m", "256m"

_libc = ctypes.CDLL(None, use_errno=True)
# Since Linux 5.14 RLIMIT_NPROC counts a uid's processes per user namespace: in the fork server's own user
# namespace that is its runs alone, not every process of the user (which made the limit unusable before).
NPROC_PER_USER_NAMESPACE = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit()) >= (5, 14)


@dataclass
class Isolation:
    mode: str              # "root" (own mount and network namespaces, a uid per worker) | "user" (the same
                           # inside a user namespace) | "landlock" (namespaces refused: Landlock and seccomp,
                           # as root a uid per worker) | "none"
    network: bool          # runs cannot reach any network
    view: str | None       # the private root runs chroot into (a path in the fork server's mount namespace)
    landlock: int = 0      # the Landlock ABI every run restricts itself with (0: none)
    seccomp: bool = False  # every run loads the seccomp filter
    problem: str = ""      # what is not isolated, and why
    tmp_keep: tuple[str, ...] = ()   # entries of the view's /tmp that hold Python (a venv under /tmp): kept
    bounds: str = ""       # what bounds a run's memory, processes and disk, and by what means

    @property
    def contained(self) -> bool:
        """The filesystem is closed to runs: by the private view or by Landlock."""
        return self.view is not None or self.landlock > 0

    def report(self) -> str:
        """One line: what isolates the runs."""
        layers = {"root": ["namespaces as root (mount, network, PID, IPC)"],
                  "user": ["namespaces in a user namespace (mount, network, PID, IPC)"]}.get(self.mode, [])
        layers += ["a private filesystem view"] if self.view else []
        layers += [f"Landlock ABI {self.landlock}"] if self.landlock else []
        layers += ["seccomp"] if self.seccomp else []
        line = "isolation: " + (" + ".join(layers) or "NONE") + (f"; {self.bounds}" if self.bounds else "")
        return line + (f"; NOT ISOLATED: {self.problem}" if self.problem else "")


def bounds(iso: Isolation, group: str, processes: int) -> str:
    """What bounds each run as a whole (group: the control groups' description, or "" where there are none)."""
    memory = f"by {group}" if group else \
        "by a watcher summing its processes (every 10 ms, or longer where the sum is slow)"
    count = f"{group} and RLIMIT_NPROC" if group else "RLIMIT_NPROC"
    disk = "a tmpfs" if iso.view else "a watcher on its directory"
    return f"per run: memory {memory}; {processes} processes by {count}; disk by {disk}"


def _call(ret: int, what: str):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, dst, fstype=None, flags=0, data=None):
    enc = lambda s: None if s is None else str(s).encode()
    _call(_libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {src} on {dst}")


def detach_mounts(base: str):
    """Lazily unmount what is mounted below base (the view; the staged sources where this process may), so that
    removing base does not walk the Python installation bound read-only into them (a second per worker). What
    cannot be unmounted stays: the removal then only takes longer."""
    base = os.path.realpath(base)
    unescape = lambda p: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p)   # mountinfo's \040
    with open("/proc/self/mountinfo") as f:
        points = sorted({p for p in (unescape(line.split()[4]) for line in f) if p.startswith(base + "/")},
                        key=len)
    for p in points:
        if not any(p.startswith(q + "/") for q in points if q != p):   # its parent's detach takes it along
            _libc.umount2(p.encode(), MNT_DETACH)


def _read_only(path: str):
    """Remount a bind mount read-only, keeping the flags the kernel locks in a user namespace."""
    f = os.statvfs(path).f_flag
    keep = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME) | (MS_RELATIME if f & 4096 else 0)
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def python_dirs() -> list[str]:
    """What the interpreter needs to import anything: its prefixes, the directory of its binary, and the
    sys.path entries inside them or named site-/dist-packages (not the script's directory or the project)."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    prefixes.add(os.path.dirname(os.path.realpath(sys.executable)))
    dirs = set(prefixes)
    for p in sys.path:
        if p and os.path.isdir(p):
            r = os.path.realpath(p)
            if any(r.startswith(q + os.sep) for q in prefixes) or os.path.basename(r) in ("site-packages",
                                                                                          "dist-packages"):
                dirs.add(r)
    covered = {"/" + d for d in SYSTEM_DIRS}
    out = []
    for d in sorted(dirs):  # parents first: a directory already bound covers its children
        if not any(d == c or d.startswith(c + os.sep) for c in covered | set(out)):
            out.append(d)
    return out


def stage_for_user(base: str, dirs: list[str], uid: int) -> dict[str, str]:
    """As root, before becoming `uid` (testing the unprivileged path on a root machine): bind what Python
    needs to a place the user can reach (the interpreter may live under root's 0700 home), in a private
    mount namespace. -> {directory: where the user finds it}."""
    _call(_libc.unshare(CLONE_NEWNS), "unshare(mount namespace)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    stage = os.path.join(base, "stage")
    out = {}
    for d in dirs:
        os.makedirs(stage + d, mode=0o755, exist_ok=True)
        _mount(d, stage + d, None, MS_BIND | MS_REC)
        out[d] = stage + d
    os.chmod(stage, 0o755)
    return out


def become(uid: int):
    """Root -> uid, with no supplementary groups and no capability (used by the unprivileged-path test)."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)   # setuid cleared it; /proc/self/uid_map needs it


def enter_namespaces() -> tuple[str, str]:
    """-> (mode, problem). Root: mount and network namespaces. A user: the same inside a new user
    namespace mapping its own uid and gid, which gives it the capabilities to mount there."""
    if os.geteuid() == 0:
        if _libc.unshare(CLONE_NEWNS | CLONE_NEWNET) == 0:
            return "root", ""
        return "none", f"unshare(mount, network) failed as root: {os.strerror(ctypes.get_errno())}"
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET) != 0:
        return "none", (f"unprivileged user namespaces are not available ({os.strerror(ctypes.get_errno())}; "
                        f"see /proc/sys/user/max_user_namespaces and kernel.unprivileged_userns_clone)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return "user", ""


def build_view(view: str, sources: dict[str, str] | None = None) -> tuple[str, ...]:
    """The private root at `view` (an empty directory): see the module docstring. sources maps a
    directory Python needs to where it can be read from (default: itself). -> the names in the view's /tmp
    that lead to Python's directories (an interpreter or venv under /tmp), which emptying /tmp must keep."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)   # nothing mounted here propagates to the host
    _mount("tmpfs", view, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    for d, size, mode in (("tmp", TMP_SIZE, "1777"), ("sandbox", WORK_SIZE, "711")):   # before Python's binds,
        os.mkdir(os.path.join(view, d))                  # which may lie below /tmp (a venv there)
        _mount("tmpfs", os.path.join(view, d), "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode={mode}")
    for d in SYSTEM_DIRS:
        src, dst = "/" + d, os.path.join(view, d)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            _bind(src, dst, directory=True)
    hidden = set()   # directories made only to hold a bind mount below them: traversable, not listable
    dirs = python_dirs() if sources is None else list(sources)
    for d in dirs:
        parent = os.path.dirname(d)
        while parent != "/" and not os.path.exists(view + parent):
            hidden.add(view + parent)
            parent = os.path.dirname(parent)
        _bind((sources or {}).get(d, d), view + d, directory=True)
    for sub, names in (("etc", ETC_FILES), ("dev", DEVICES)):
        os.mkdir(os.path.join(view, sub))
        for n in names:
            src = os.path.join("/", sub, n)
            if os.path.exists(src):
                _bind(os.path.realpath(src), os.path.join(view, sub, n), directory=False, read_only=sub == "etc")
    for h in sorted(hidden, key=len, reverse=True):
        os.chmod(h, 0o111)
    f = os.statvfs(view).f_flag
    _mount(None, view, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | (f & (MS_NOATIME | MS_NODIRATIME)))
    return tuple(sorted({d.split(os.sep)[2] for d in dirs if d.startswith("/tmp" + os.sep)}))


def _bind(src: str, dst: str, directory: bool, read_only: bool = True):
    if directory:
        os.makedirs(dst, exist_ok=True)
    else:
        open(dst, "w").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    if read_only:
        _read_only(dst)


def become_user(base: str, as_user: int) -> dict[str, str] | None:
    """Root testing the unprivileged path: after this, nothing of root remains. -> where Python's directories
    are staged for the user (None: read where they are)."""
    try:
        sources = stage_for_user(base, python_dirs(), as_user)
    except OSError:   # mounts refused (a container): Python's directories are read where they are
        sources = None
    os.chown(base, as_user, as_user)
    become(as_user)
    return sources


def setup(base: str, sources: dict[str, str] | None, watched: bool) -> tuple[Isolation, bytes | None]:
    """Once, in the fork server, single-threaded: namespaces and the view under `base` where the kernel
    allows them; which Landlock ABI the runs get; the runs' seccomp program (watched: no control group
    bounds the runs, so the fork server's watcher does, which cannot see System V segments or a memfd
    whose pages are not mapped: the filter refuses both). -> (what isolates the runs and what does not,
    the compiled seccomp program or None)."""
    abi = landlock.abi()
    mode, problem = enter_namespaces()
    view, keep, problems = None, (), []
    if mode != "none":
        view = os.path.join(base, "view")
        os.mkdir(view)
        try:
            keep = build_view(view, sources)
        except OSError as e:
            view, problem = None, f"no private filesystem view ({e})"
            problems += [f"{problem}: Landlock alone closes the filesystem"] if abi else []
    elif abi:
        mode = "landlock"
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)   # runs of the same uid cannot ptrace the fork server
    root, shared = os.geteuid() == 0, mode in ("landlock", "none")   # shared: runs see the host's processes
    program, unknown = seccomp.run_filter(user_files=shared and not root, ipc=shared or watched, memfd=watched)
    if view is None and not abi:
        problems.append(f"{problem}, and no Landlock (Linux >= 5.13 with landlock among its LSMs): code sees "
                        f"every file this {'machine' if root else 'user'} can read")
    network = mode in ("root", "user") or program is not None
    if program is None:
        problems.append("no seccomp filter (libseccomp.so.2 not found: install libseccomp2)" +
                        ("" if network else "; runs can reach the network"))
    if unknown:
        problems.append(f"this libseccomp does not know {', '.join(unknown)}: those calls are not filtered")
    if shared and not root and 0 < abi < 6:
        problems.append(f"Landlock ABI {abi} (< 6, Linux < 6.12) cannot scope signals: runs can signal this "
                        f"user's other processes")
    if mode == "user" and not NPROC_PER_USER_NAMESPACE:
        problems.append("runs have no process limit (before Linux 5.14 RLIMIT_NPROC counts every process of "
                        "the user), so a fork bomb is stopped only by the timeout")
    if shared and root and not all(map(_others_can_read, python_dirs())):
        problems.append("Python's directories are not readable by other users, so runs (each worker's own uid) "
                        "can import only what the fork server preloaded")
    return Isolation(mode, network, view, abi, program is not None, "; ".join(problems), keep), program


def _others_can_read(path: str) -> bool:
    """Whether a user other than the owner can reach and list `path` (every parent searchable)."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        if not mode & stat.S_IXOTH or (i == len(parts) and not mode & stat.S_IROTH):
            return False
    return True


def run_paths(view: bool) -> tuple[list[str], list[str]]:
    """-> (read and execute, read and write) for the runs' Landlock rules: Python's directories, the system's
    library directories, the files of /etc Python reads; the view's private /tmp (not the host's: without a
    view a run's only writable place is its working directory, which each run adds), /dev/null and friends.
    Paths as the runs see them (inside the view: the same paths)."""
    read = python_dirs() + ["/" + d for d in SYSTEM_DIRS] + ["/etc/" + f for f in ETC_FILES]
    return read, (["/tmp"] if view else []) + ["/dev/" + d for d in DEVICES]


def tasks_of(uid: int) -> int:
    """The tasks (threads included) of `uid`: what RLIMIT_NPROC counts where no user namespace separates a
    run from the user's other processes."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return n


def enter_view(view: str, workdir: str):
    """In a run's process: chroot into the view and go to its working directory (a path in the view)."""
    _call(_libc.chroot(view.encode()), f"chroot {view}")
    os.chdir(workdir)


def own_pid_namespace():
    """Fork the run as PID 1 of new PID and IPC namespaces; returns in the run. The calling process stays
    outside as its shim: it waits for the run, removes every System V object left in the IPC namespace, and
    ends as the run did (same exit status or signal); if the shim is killed, the run is too (parent-death
    signal), and with it everything in its namespace."""
    import resource
    import signal
    _call(_libc.unshare(CLONE_NEWPID | CLONE_NEWIPC), "unshare(pid and IPC namespaces)")
    pid = os.fork()
    if pid == 0:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.setsid()   # its own process group: kill(0, ...) cannot reach the shim's
        return
    os.closerange(0, 4096)   # the run alone holds its pipes: they close when it and its children end
    _, status = os.waitpid(pid, 0)
    remove_ipc_objects()
    if os.WIFSIGNALED(status):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 70)


def remove_ipc_objects() -> int:
    """Remove every System V shared memory segment, message queue and semaphore set of this process's IPC
    namespace (found by index, as ipcs does: no /proc needed) -> how many."""
    buf, n = ctypes.create_string_buffer(512), 0
    for info, stat_, ctl in ((SHM_INFO, SHM_STAT, _libc.shmctl), (MSG_INFO, MSG_STAT, _libc.msgctl),
                             (SEM_INFO, SEM_STAT, None)):
        call = ctl or (lambda i, cmd, b: _libc.semctl(i, 0, cmd, b))
        for index in range(call(0, info, buf) + 1):   # *_INFO returns the highest index in use (-1: none)
            ident = call(index, stat_, buf)
            if ident >= 0:
                n += call(ident, IPC_RMID, None) == 0
    return n


def drop_privileges(uid: int | None):
    """In a run's process: become `uid` (root mode), then hold no capability and set no_new_privs."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    none = (Data * 2)(Data(0, 0, 0), Data(0, 0, 0))
    _call(_libc.capset(ctypes.byref(Header(LINUX_CAPABILITY_VERSION_3, 0)), none), "capset")
    _call(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
