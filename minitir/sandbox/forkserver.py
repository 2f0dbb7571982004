"""The worker process: `python -m minitir.sandbox.forkserver`, one per pool slot.

It imports math, numpy, sympy, itertools and fractions once, isolates itself (isolation.setup: namespaces
and the private view, once), and then serves requests over stdin/stdout (length-prefixed JSON). Each run
happens in a child forked *before* its request arrives, so the fork is off the critical path: the child
starts a new session, enters the view, waits for its code, drops its privileges, sets its rlimits and
runs. The fork server is a child subreaper: whatever a run starts, daemonised or not, ends up as its
child and is killed and reaped before the result goes back; the view's /tmp and the run's directory are
emptied after every run.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import asdict, dataclass

from minitir.sandbox import budget, isolation, landlock, seccomp
from minitir.sandbox.child import MEMORY_EXIT, run_user_code

PRELOAD = ("math", "itertools", "fractions", "numpy", "sympy")
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")
UID_BASE = 1_800_000_000   # far above the ranges /etc/subuid hands out (100000 and up)
MAX_PROCESSES = 64   # per run (RLIMIT_NPROC): a fork bomb stops there instead of filling the host's memory
PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 36, 1, 4


# --- the run's process -----------------------------------------------------------------------
def _std_fds(out_w: int, err_w: int, keep: int):
    """stdin from /dev/null, stdout/stderr to the run's pipes; every other inherited fd (the host's pipes
    too) closed but `keep`."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd != keep:
            with suppress(OSError):
                os.close(fd)


def _spare_child(run: "_Run", server: "ForkServer", slot: int, req_r: int, out_w: int, err_w: int):
    """Forked ahead of its request: enter its control groups, isolate, build its Landlock rules, wait for the
    request, drop privileges, enter Landlock and the seccomp filter, set the limits it asks for, run. Never
    returns. It keeps its privileges while it waits, so the uid sweep after the previous run cannot touch it."""
    iso, uid, libc = server.iso, server.uid, ctypes.CDLL(None)
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)   # a fork server killed takes its spare along
        if server.groups is not None:
            server.groups.enter(slot)   # before the view: /sys is not in it
        else:   # the watcher reads the memory of the run and its shim (fork copied the fork server's 0)
            libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        os.setsid()
        _std_fds(out_w, err_w, keep=req_r)
        if iso.view:
            isolation.enter_view(iso.view, run.inside)
        else:
            os.chdir(run.outside)
        if iso.mode in ("root", "user"):
            isolation.own_pid_namespace()   # from here on: the run, PID 1 of its own namespace
        rules = None   # built now, while it waits: opening the paths costs no run any time
        if iso.landlock:
            rules = landlock.ruleset(iso.landlock, server.read, server.write + [run.inside])
        os.environ.clear()
        os.environ.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME=run.inside, TMPDIR=run.inside,
                          LANG="C.UTF-8", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg",
                          PYTHONHASHSEED="0")
        tempfile.tempdir = run.inside
        sys.path = [p for p in sys.path if p and os.path.isabs(p)]  # no cwd-relative imports of host files
        with os.fdopen(req_r, "rb") as f:
            req = json.loads(f.read() or b"null")
        if req is None:  # the fork server is shutting down
            os._exit(0)
        nproc = MAX_PROCESSES   # a worker's own uid, or its user namespace: its runs alone
        if uid is None and iso.mode not in ("root", "user"):   # else the user's other tasks count too, now
            nproc += isolation.tasks_of(os.getuid()) - 1     # (this one is the run: counted in both)
        isolation.drop_privileges(uid)                # no capability, no_new_privs
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)   # a new uid cleared both
        if server.groups is None:
            libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        if rules is not None:
            landlock.restrict(rules)
        if server.program is not None:
            seccomp.load(server.program)
        limits = [(resource.RLIMIT_CPU, int(float(req["timeout_s"])) + 1),
                  (resource.RLIMIT_AS, server.vm_base + int(req["memory_mb"]) * 2 ** 20),
                  (resource.RLIMIT_FSIZE, 16 * 2 ** 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
        if uid is not None or iso.mode != "user" or isolation.NPROC_PER_USER_NAMESPACE:
            limits.append((resource.RLIMIT_NPROC, nproc))
        for what, n in limits:
            resource.setrlimit(what, (n, n))
        code = run_user_code(req["code"])
    except BaseException:
        code = 70
    os._exit(code)


# --- the fork server's bookkeeping -----------------------------------------------------------
def read_msg(f):
    head = f.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("<I", head)
    return json.loads(f.read(n))


def write_msg(f, obj):
    data = json.dumps(obj).encode()
    f.write(struct.pack("<I", len(data)) + data)
    f.flush()


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _reap():
    """Collect every child that has exited (orphans of a run end up as our children: we are a subreaper)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass
    except ChildProcessError:
        pass


def _waitpid(pid: int, flags: int = 0) -> int | None:
    """os.waitpid's status (None: still running with WNOHANG); a child that _reap collected first (we are a
    subreaper: it collects every child that ended) counts as killed, since only a run stopped for its time or
    budget, whose status is not read, can end between the two."""
    try:
        done, status = os.waitpid(pid, flags)
    except ChildProcessError:
        return signal.SIGKILL
    return status if done else None


def _end_run(shim: int):
    """Kill the run under its shim and wait a second for the shim to end -> its wait status, or None."""
    for pid in budget.children_of(shim):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(1000):
        if (status := _waitpid(shim, os.WNOHANG)) is not None:
            return status
        time.sleep(0.001)
    return None


def _kill_children(keep: set[int]):
    """Kill and reap every child of this process but `keep` (the next spare): as a subreaper, that is
    everything a run left behind, daemonised or not."""
    for _ in range(10_000):
        _reap()
        kids = [p for p in budget.children_of(os.getpid()) if p not in keep]
        if not kids:
            return
        for pid in kids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.0005)


def _kill_uid(uid: int):
    """Kill every process owned by uid: forks a reaper that becomes uid and sends SIGKILL to -1."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def _empty(directory: str, pick=lambda entry: True):
    """Remove the entries of directory that pick(entry) chooses; one that vanished or resists is skipped,
    not the rest."""
    for entry in os.scandir(directory):
        with suppress(OSError):
            if not pick(entry):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _remove_owned(uid: int, since: float):
    """Without a view: files the run's uid left in the host's shared temporary directories."""
    for d in SHARED_TMP:
        with suppress(OSError):
            if os.stat(d).st_mtime >= since - 1:
                _empty(d, lambda entry: entry.stat(follow_symlinks=False).st_uid == uid)


@dataclass
class _Run:
    outside: str     # its working directory as the fork server sees it
    inside: str      # the same directory as the run sees it (inside the view)


@dataclass
class _Spare:
    pid: int
    req_w: int
    out_r: int
    err_r: int
    run: _Run


class ForkServer:
    def __init__(self, base: str, iso, program: bytes | None, uid: int | None, groups: budget.Groups | None):
        self.base, self.iso, self.program, self.uid, self.groups = base, iso, program, uid, groups
        self.read, self.write = isolation.run_paths(bool(iso.view))   # the runs' Landlock paths, but their own
        self.vm_base = _vm_size()
        self.slot = 0   # the control group the spare is in: runs alternate, so a run never shares its budget
        self.spare = self._fork_spare()

    def _new_run(self) -> _Run:
        if self.iso.view:
            outside = tempfile.mkdtemp(prefix="run-", dir=os.path.join(self.iso.view, "sandbox"))
            return _Run(outside, "/sandbox/" + os.path.basename(outside))
        outside = tempfile.mkdtemp(prefix="run-", dir=self.base)
        return _Run(outside, outside)

    def _fork_spare(self) -> _Spare:
        run = self._new_run()
        if self.uid is not None:
            os.chown(run.outside, self.uid, self.uid)
        req_r, req_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            _spare_child(run, self, self.slot, req_r, out_w, err_w)
        for fd in (req_r, out_w, err_w):
            os.close(fd)
        return _Spare(pid, req_w, out_r, err_r, run)

    def execute(self, req: dict) -> dict:
        """Run req in the spare; fork the next spare while it runs; clean up after it."""
        spare, slot, start, t0 = self.spare, self.slot, time.time(), time.perf_counter()
        memory = int(req["memory_mb"]) * 2 ** 20
        if self.groups is not None:
            self.groups.set_limit(slot, memory, MAX_PROCESSES + 1)   # + 1: the PID namespace's shim
        kills = self.groups.oom_kills(slot) if self.groups is not None else 0
        with os.fdopen(spare.req_w, "wb") as f:  # the spare is blocked reading it, so any size goes through
            f.write(json.dumps(req).encode())
        self.slot ^= 1
        self.spare = self._fork_spare()
        over = lambda: self._over_budget(spare, memory, slot, kills)   # noqa: E731
        bufs, dropped, status, stopped = _collect(spare, float(req["timeout_s"]), int(req["max_output_bytes"]), over)
        if status is None:   # ended since: collect its status before _reap takes it
            status = _waitpid(spare.pid, os.WNOHANG)
        _reap()
        stopped = stopped or over()   # a run may end within a tick of passing its budget
        if status is None and self.iso.mode in ("root", "user"):   # the run first (its PID namespace dies with
            status = _end_run(spare.pid)                               # it), so its shim empties its IPC namespace
        if status is None or any(p != self.spare.pid for p in budget.children_of(os.getpid())):
            # something is still running: the child (deadline) or what it started, maybe daemonised
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(spare.pid, signal.SIGKILL)
            if self.uid is not None:
                _kill_uid(self.uid)
            if status is None:
                status = _waitpid(spare.pid)
            _kill_children(keep={self.spare.pid})
        shutil.rmtree(spare.run.outside, ignore_errors=True)
        if self.iso.view:
            _empty(os.path.join(self.iso.view, "tmp"), lambda entry: entry.name not in self.iso.tmp_keep)
        elif self.uid is not None:
            _remove_owned(self.uid, start)
        return _result(bufs, dropped, status, stopped, time.perf_counter() - t0)

    def _over_budget(self, spare: _Spare, memory: int, slot: int, kills: int) -> str | None:
        """Why the run must stop now ("memory", "disk", "unwatched": its memory cannot be read), or None:
        the kernel killed one of its processes for its group's budget, or (without a group) the watcher's
        sum over its processes passed it; without a private view, its directory passed DISK_BYTES."""
        if self.groups is not None:
            if self.groups.oom_kills(slot) > kills:
                return "memory"
        else:
            for attempt in range(2):   # a process between its new uid and PR_SET_DUMPABLE: read it again
                try:
                    if budget.over_memory(budget.descendants(os.getpid(), skip={self.spare.pid}), memory):
                        return "memory"
                    break
                except PermissionError:
                    if attempt:
                        return "unwatched"
                    time.sleep(0.001)
        if not self.iso.view and budget.disk_of(spare.run.outside) > budget.DISK_BYTES:
            return "disk"
        return None

    def close(self):
        os.close(self.spare.req_w)  # the spare reads an empty request and exits
        os.waitpid(self.spare.pid, 0)
        if self.groups is not None:
            self.groups.remove()


def _collect(spare: _Spare, timeout_s: float, cap: int, over_budget):
    """Read the run's stdout/stderr (up to cap bytes each) until it exits, its deadline passes ("timeout") or
    over_budget(), asked every budget.TICK_S, gives a reason to stop it. -> (outputs, bytes dropped, wait
    status or None, why it was stopped or None)."""
    out_r, err_r = spare.out_r, spare.err_r
    bufs = {1: bytearray(), 2: bytearray()}
    dropped = {1: 0, 2: 0}
    which = {out_r: 1, err_r: 2}
    deadline = time.perf_counter() + timeout_s
    pidfd = os.pidfd_open(spare.pid)
    open_fds, status, stopped, tick = {out_r, err_r}, None, None, time.perf_counter() + budget.TICK_S
    while True:
        now = time.perf_counter()
        if now >= deadline:
            stopped = "timeout"
            break
        if now >= tick:   # the check costs ~2 ms a process when exact: never more than a third of the time
            if stopped := over_budget():
                break
            tick = time.perf_counter() + max(budget.TICK_S, 2 * (time.perf_counter() - now))
        wait = min(deadline, tick) - now
        ready, _, _ = select.select(list(open_fds) + ([pidfd] if status is None else []), [], [], wait)
        for fd in ready:
            if fd == pidfd:
                status = _waitpid(spare.pid)
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
                continue
            room = max(cap - len(bufs[which[fd]]), 0)
            bufs[which[fd]] += chunk[:room]
            dropped[which[fd]] += len(chunk) - min(len(chunk), room)
        if status is not None and (not open_fds or time.perf_counter() > deadline):
            break
        if status is not None:  # the child is done; a descendant may hold the pipes: drain briefly
            r, _, _ = select.select(list(open_fds), [], [], 0.01)
            if not r:
                break
    for fd in (out_r, err_r, pidfd):
        os.close(fd)
    return bufs, dropped, status, stopped


STOPPED = {"memory": "the run's processes together passed its memory budget",
           "disk": f"the run's files passed its disk budget ({budget.DISK_BYTES >> 20} MB)",
           "unwatched": "the sandbox could not read the run's memory use, so it stopped the run"}


def _result(bufs, dropped, status, stopped: str | None, duration: float) -> dict:
    def text(i):
        s = bufs[i].decode("utf-8", errors="replace")
        return s + (f"\n... (output truncated: {dropped[i]} more bytes)" if dropped[i] else "")

    if stopped in STOPPED:
        st = "sandbox_error" if stopped == "unwatched" else stopped
        return dict(status=st, stdout=text(1), stderr=text(2) + f"sandbox: {STOPPED[stopped]}\n", exit_code=None,
                    duration_s=duration)
    if stopped == "timeout":
        st, code = "timeout", None
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        st, code = ("timeout" if sig == signal.SIGXCPU else "killed"), -sig
    else:
        code = os.WEXITSTATUS(status)
        st = "ok" if code == 0 else "memory" if code == MEMORY_EXIT else "error"
    return dict(status=st, stdout=text(1), stderr=text(2), exit_code=code, duration_s=duration)


def _warm_up():
    """Run typical snippets once, so lazy imports and caches are filled before the first fork, not in
    every child (a first sympy.factor costs ~30 ms of lazy work)."""
    try:
        import sympy
        x, y = sympy.symbols("x y")
        sympy.factor(x ** 4 - 1), sympy.expand((x + y) ** 3), sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
        sympy.solve([x + y - 3, x - y - 1], [x, y]), sympy.Rational(3, 4) + sympy.sqrt(8), sympy.factorint(10 ** 12 + 1)
        sympy.binomial(30, 12), sympy.isprime(2 ** 31 - 1), sympy.nsimplify(0.75), sympy.Matrix([[1, 2], [3, 4]]).det()
        sympy.integrate(x ** 2, x), sympy.limit(sympy.sin(x) / x, x, 0), sympy.latex(x ** 2)
        import numpy
        numpy.linalg.solve(numpy.eye(2), numpy.ones(2))
    except Exception:
        pass


def main(as_user: int | None = None):
    """Warm imports, isolation, then one forked child per request (stdin/stdout framing)."""
    import importlib
    for name in PRELOAD:
        with suppress(ImportError):
            importlib.import_module(name)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing may write on the protocol channel by accident
    base = tempfile.mkdtemp(prefix="minitir-sandbox-")   # runs' directories live under one private parent
    os.chmod(base, 0o711)
    # warming up leaves the process single-threaded (one BLAS thread), so it may come before isolation.setup,
    # whose unshare needs a process of one thread
    _warm_up()
    sources = isolation.become_user(base, as_user) if as_user is not None else None
    groups, why = budget.Groups.create(f"minitir-{os.getpid()}")
    iso, program = isolation.setup(base, sources, watched=groups is None)
    root = os.geteuid() == 0
    uid = UID_BASE + os.getpid() if root else None   # a uid of its own per worker
    iso.bounds = isolation.bounds(iso, groups.describe() if groups else "", MAX_PROCESSES)
    dirs = [d for s in (0, 1) for d in groups.slot_dirs(s)] if groups else []
    write_msg(stdout, {"ready": True, "pid": os.getpid(), "base_dir": base, "uid": uid, "groups": dirs,
                       "no_groups": why, **asdict(iso)})
    server = ForkServer(base, iso, program, uid, groups)
    try:
        while (req := read_msg(stdin)) is not None:
            write_msg(stdout, server.execute(req))
    finally:
        server.close()
        isolation.detach_mounts(base)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[sys.argv.index("--as-user") + 1]) if "--as-user" in sys.argv else None)
