"""Isolated Python execution for model-written code: rlimits, a warm fork-server pool, an HTTP mode.

    from sandbox import Sandbox
    with Sandbox(timeout_s=5, memory_mb=512, workers=2) as sb:
        r = sb.run("print(2**100)")            # ExecResult(status='ok', stdout='1267...\\n', ...)
        rs = sb.run_many(["1+1", "1/0"])      # in input order
        fut = sb.submit("import sympy; sympy.factorint(2**64-1)")   # non-blocking

    python sandbox.py run FILE|-                       # one run, result as JSON
    python sandbox.py serve --host 127.0.0.1 --port 8080   # SandboxFusion-style POST /run_code

How a run is isolated. Each worker is a fork server: a separate interpreter that imported math, numpy,
sympy, itertools and fractions once. Per run it forks a child that starts a new session, enters a new
network namespace (no interfaces up, so no network), sets rlimits (CPU time, address space, file size,
open files, processes), drops to an unprivileged uid of its own when running as root, and executes the
code in a fresh temporary directory with an empty stdin and a minimal environment. The fork server is a
child subreaper: whatever the run started, daemonised or not, ends up as its child and is killed and
reaped when the run ends; as root it also kills every process of the run's uid and deletes files that
uid left in /tmp, /var/tmp and /dev/shm. Without root there is no uid to drop to, so the process limit,
the namespace and that file clean-up do not apply; a log line says so once.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("minitir.sandbox")
STATUSES = ("ok", "error", "timeout", "memory", "killed")
MEMORY_EXIT = 86           # the child's exit code for MemoryError
PRELOAD = ("math", "itertools", "fractions", "numpy", "sympy")
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")
CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 8, 38
CAP_DAC_READ_SEARCH, LINUX_CAPABILITY_VERSION_3 = 2, 0x20080522


@dataclass
class ExecResult:
    status: str                # ok | error | timeout | memory | killed
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    duration_s: float = 0.0

    @property
    def error(self) -> bool:
        return self.status != "ok"

    @property
    def text(self) -> str:
        """What the model sees, as the paper's sandbox client builds it (env/math/sandbox_utils.py): a run
        that succeeded shows its output; one that failed shows its error, the short traceback with the
        `File "...", ` prefixes and caret lines taken out, and why it stopped."""
        if self.status == "ok":
            return self.stdout.rstrip("\n")
        err = re.sub(r'File ".*?", ', "", self.stderr)
        err = re.sub(r"^\s*[\^~]+\s*$\n?", "", err, flags=re.MULTILINE).rstrip("\n")
        reason = {"timeout": "TimeoutError: the code ran past its time limit",
                  "memory": "" if "MemoryError" in self.stderr else "MemoryError: the code ran out of memory",
                  "killed": f"the code was killed (exit status {self.exit_code})"}.get(self.status, "")
        return "\n".join(p for p in (err, reason) if p)


# =============================================================================================
# the child: runs the user's code (inside a forked fork-server process)
# =============================================================================================
class _Counting:
    """stdout wrapper remembering whether anything was printed (for the notebook-style last value)."""

    def __init__(self, stream):
        self.stream, self.wrote = stream, False

    def write(self, s):
        self.wrote = self.wrote or bool(s)
        return self.stream.write(s)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _short_traceback(exc: BaseException) -> str:
    """The traceback restricted to the user's own frames: no sandbox frames, no host paths."""
    import traceback
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(type(exc), exc))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<code>"]
    lines = traceback.format_list(frames)
    return "Traceback (most recent call last):\n" + "".join(lines) + \
        "".join(traceback.format_exception_only(type(exc), exc))


def _run_user_code(code: str) -> int:
    import builtins
    import linecache
    sys.stdout = out = _Counting(open(1, "w", encoding="utf-8", errors="replace", closefd=False))
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stdin = open(0, "r", closefd=False)
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
    env = {"__name__": "__main__", "__builtins__": builtins}
    status = 0
    try:
        tree = ast.parse(code, "<code>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<code>", "exec"), env)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<code>", "eval"), env)
            if value is not None and not out.wrote:
                print(repr(value))
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except MemoryError:
        sys.stderr.write("MemoryError: the code ran out of memory\n")
        status = MEMORY_EXIT
    except BaseException as e:  # noqa: BLE001 - everything the user's code raises is reported to it
        try:
            sys.stderr.write(_short_traceback(e))
        except MemoryError:
            status = MEMORY_EXIT
        else:
            status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    return status


def _drop_privileges(uid: int):
    """Become `uid`, keeping one capability: CAP_DAC_READ_SEARCH, so that imports still read the
    interpreter's files wherever they are installed (under /root, say). No write, signal or other
    privilege remains, and no_new_privs stops setuid programs from giving any back."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    keep = 1 << CAP_DAC_READ_SEARCH
    data = (Data * 2)(Data(keep, keep, 0), Data(0, 0, 0))
    if libc.capset(ctypes.byref(Header(LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _spare_child(workdir: str, uid: int | None, vm_base: int, req_r: int, out_w: int, err_w: int):
    """In a child forked *before* its request arrives (so the fork is off the critical path): isolate,
    wait for the request, drop privileges, set the limits it asks for, run. Never returns. It stays root
    while it waits, so the uid sweep after the previous run cannot touch it."""
    import resource
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in map(int, os.listdir("/proc/self/fd")):  # close everything inherited (the host pipes too)
            if fd > 2 and fd != req_r:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8",
                          OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
        tempfile.tempdir = workdir
        sys.path = [p for p in sys.path if p and os.path.isabs(p)]  # no cwd-relative imports of host files
        with os.fdopen(req_r, "rb") as f:
            req = json.loads(f.read() or b"null")
        if req is None:  # the fork server is shutting down
            os._exit(0)
        if uid is not None:
            _drop_privileges(uid)
        limits = [(resource.RLIMIT_CPU, int(float(req["timeout_s"])) + 1),
                  (resource.RLIMIT_AS, vm_base + int(req["memory_mb"]) * 2 ** 20),
                  (resource.RLIMIT_FSIZE, 16 * 2 ** 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
        if uid is not None:
            limits.append((resource.RLIMIT_NPROC, 64))
        for what, n in limits:
            resource.setrlimit(what, (n, n))
        code = _run_user_code(req["code"])
    except BaseException:
        code = 70
    os._exit(code)


# =============================================================================================
# the fork server: one per worker, a separate interpreter holding the warm imports
# =============================================================================================
def _read_msg(f):
    head = f.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("<I", head)
    return json.loads(f.read(n))


def _write_msg(f, obj):
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


def _kill_children(keep: set[int]):
    """Kill and reap every child of this process but `keep` (the next spare): as a subreaper, that is
    everything a run left behind, daemonised or not."""
    for _ in range(10_000):
        _reap()
        kids = [p for p in _children() if p not in keep]
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.0005)


def _children() -> list[int]:
    try:  # one read, where the kernel has it
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    me, kids = str(os.getpid()), []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.append(int(pid))
            except OSError:
                continue
    return kids


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


def _remove_owned(uid: int, since: float):
    for d in SHARED_TMP:
        try:
            if os.stat(d).st_mtime < since - 1:
                continue
            for entry in os.scandir(d):
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
        except OSError:
            continue


@dataclass
class _Spare:
    pid: int
    req_w: int
    out_r: int
    err_r: int
    workdir: str


def _fork_spare(uid: int | None, vm_base: int, base_dir: str) -> _Spare:
    workdir = tempfile.mkdtemp(prefix="run-", dir=base_dir)
    if uid is not None:
        os.chown(workdir, uid, uid)
    req_r, req_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _spare_child(workdir, uid, vm_base, req_r, out_w, err_w)
    for fd in (req_r, out_w, err_w):
        os.close(fd)
    return _Spare(pid, req_w, out_r, err_r, workdir)


def _execute(req: dict, spare: _Spare, uid: int | None, fork_next) -> tuple[dict, _Spare]:
    """Run req in the spare; fork the next spare while it runs. -> (result, next spare)."""
    start = time.time()
    t0 = time.perf_counter()
    pid, out_r, err_r, workdir = spare.pid, spare.out_r, spare.err_r, spare.workdir
    with os.fdopen(spare.req_w, "wb") as f:  # the spare is blocked reading it, so any size goes through
        f.write(json.dumps(req).encode())
    nxt = fork_next()
    cap = int(req["max_output_bytes"])
    bufs = {out_r: bytearray(), err_r: bytearray()}
    dropped = {out_r: 0, err_r: 0}
    deadline = time.perf_counter() + float(req["timeout_s"])
    pidfd = os.pidfd_open(pid)
    open_fds, status, timed_out = {out_r, err_r}, None, False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select(list(open_fds) + ([pidfd] if status is None else []), [], [], left)
        for fd in ready:
            if fd == pidfd:
                _, status = os.waitpid(pid, 0)
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
                continue
            room = cap - len(bufs[fd])
            bufs[fd] += chunk[:max(room, 0)]
            dropped[fd] += max(len(chunk) - max(room, 0), 0)
        if status is not None and (not open_fds or time.perf_counter() > deadline):
            break
        if status is not None:  # the child is done; a descendant may hold the pipes: drain briefly
            r, _, _ = select.select(list(open_fds), [], [], 0.01)
            if not r:
                break
    _reap()
    if status is None or any(p != nxt.pid for p in _children()):
        # something is still running: the child (deadline) or what it started, maybe daemonised
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if uid is not None:
            _kill_uid(uid)
        if status is None:
            _, status = os.waitpid(pid, 0)
        _kill_children(keep={nxt.pid})
    for fd in (out_r, err_r, pidfd):
        os.close(fd)
    shutil.rmtree(workdir, ignore_errors=True)
    if uid is not None:
        _remove_owned(uid, start)

    def text(fd):
        s = bufs[fd].decode("utf-8", errors="replace")
        return s + (f"\n... (output truncated: {dropped[fd]} more bytes)" if dropped[fd] else "")

    if timed_out:
        st, code = "timeout", None
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        st, code = ("timeout" if sig == signal.SIGXCPU else "killed"), -sig
    else:
        code = os.WEXITSTATUS(status)
        st = "ok" if code == 0 else "memory" if code == MEMORY_EXIT else "error"
    return dict(status=st, stdout=text(out_r), stderr=text(err_r), exit_code=code,
                duration_s=time.perf_counter() - t0), nxt


def fork_server():
    """The worker process: warm imports once, then one forked child per request (stdin/stdout framing)."""
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = "1"
    import ctypes
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    root = os.geteuid() == 0
    uid = 100_000 + os.getpid() if root else None  # a uid of its own: the kill and file sweeps hit only this run
    # the fork server talks to the host over pipes only, so it can give up the network for all its runs:
    # a new namespace once here, instead of one per run (creating one costs milliseconds)
    isolated_net = ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) == 0
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing may write on the protocol channel by accident
    # runs get directories under one private parent, so /tmp itself changes only when a run writes there
    base_dir = tempfile.mkdtemp(prefix="minitir-sandbox-")
    os.chmod(base_dir, 0o711)
    _write_msg(stdout, {"ready": True, "root": root, "net_isolated": isolated_net, "uid": uid,
                        "pid": os.getpid(), "base_dir": base_dir})
    _warm_up()
    vm_base = _vm_size()
    spare = _fork_spare(uid, vm_base, base_dir)
    try:
        while (req := _read_msg(stdin)) is not None:
            result, spare = _execute(req, spare, uid, lambda: _fork_spare(uid, vm_base, base_dir))
            _write_msg(stdout, result)
    finally:
        os.close(spare.req_w)  # the spare reads an empty request and exits
        os.waitpid(spare.pid, 0)
        shutil.rmtree(base_dir, ignore_errors=True)


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


# =============================================================================================
# the host side: a pool of fork servers
# =============================================================================================
class _Worker:
    def __init__(self):
        self.proc, self.base_dir = None, None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-u", os.path.abspath(__file__), "_forkserver"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        hello = _read_msg(self.proc.stdout)
        if not hello:
            raise RuntimeError("sandbox worker failed to start")
        self.base_dir = hello["base_dir"]
        return hello

    def run(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        result: list = []

        def talk():
            _write_msg(self.proc.stdin, req)
            result.append(_read_msg(self.proc.stdout))

        t = threading.Thread(target=talk, daemon=True)
        t.start()
        t.join(float(req["timeout_s"]) + 30)  # the fork server enforces the deadline; this guards the server
        if not result or result[0] is None:
            self.stop()
            return dict(status="killed", stdout="", stderr="sandbox worker died", exit_code=None, duration_s=0.0)
        return result[0]

    def stop(self, graceful: bool = False):
        if self.proc is None:
            return
        if graceful:  # end of input: the fork server ends its spare and removes its directory itself
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        self.proc = None


_warned = False


class Sandbox:
    """A pool of `workers` fork servers. Thread-safe; `submit` returns a Future without blocking."""

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_bytes: int = 16384,
                 workers: int = 2):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.timeout_s, self.memory_mb, self.max_output_bytes = timeout_s, memory_mb, max_output_bytes
        self._q: queue.Queue = queue.Queue()
        self._workers = [_Worker() for _ in range(workers)]
        hellos = list(ThreadPoolExecutor(workers).map(lambda w: w.start(), self._workers))
        global _warned
        if not hellos[0]["net_isolated"] and not _warned:
            _warned = True
            log.warning("sandbox: %s", "not running as root: no uid drop, no network namespace, no process limit"
                        if not hellos[0]["root"] else "network namespaces unavailable: code can reach the network")
        self.isolation, self.worker_info = hellos[0], hellos
        self._threads = [threading.Thread(target=self._loop, args=(w,), daemon=True) for w in self._workers]
        for t in self._threads:
            t.start()

    def _loop(self, worker: _Worker):
        while (item := self._q.get()) is not None:
            req, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(ExecResult(**worker.run(req)))
            except Exception as e:  # never lose a run: report it as killed
                fut.set_result(ExecResult("killed", stderr=f"sandbox failure: {e}"))
        worker.stop(graceful=True)

    def submit(self, code: str, timeout_s: float | None = None, memory_mb: int | None = None) -> Future:
        fut: Future = Future()
        self._q.put((dict(code=code, timeout_s=timeout_s or self.timeout_s, memory_mb=memory_mb or self.memory_mb,
                          max_output_bytes=self.max_output_bytes), fut))
        return fut

    def run(self, code: str, timeout_s: float | None = None, memory_mb: int | None = None) -> ExecResult:
        return self.submit(code, timeout_s, memory_mb).result()

    def run_many(self, codes: list[str]) -> list[ExecResult]:
        return [f.result() for f in [self.submit(c) for c in codes]]

    def close(self):
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# =============================================================================================
# HTTP: a SandboxFusion-compatible POST /run_code, and a client for it
# =============================================================================================
_FUSION_STATUS = {"ok": "Finished", "error": "Finished", "timeout": "TimeLimitExceeded", "memory": "Finished",
                  "killed": "Finished"}


def to_fusion(r: ExecResult) -> dict:
    return {"status": "Success" if r.status == "ok" else "Failed", "message": "", "compile_result": None,
            "run_result": {"status": _FUSION_STATUS[r.status], "execution_time": r.duration_s,
                           "return_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr},
            "files": {}, "minitir_status": r.status}


def from_fusion(d: dict) -> ExecResult:
    rr = d.get("run_result") or {}
    status = d.get("minitir_status")
    if status not in STATUSES:
        code = rr.get("return_code")
        status = ("timeout" if rr.get("status") == "TimeLimitExceeded" else
                  "ok" if d.get("status") == "Success" and code in (0, None) else "error")
    return ExecResult(status, rr.get("stdout") or "", rr.get("stderr") or d.get("message") or "",
                      rr.get("return_code"), float(rr.get("execution_time") or 0.0))


def parse_request(body: bytes, default_timeout: float, default_memory: int) -> tuple[str, float, int]:
    """Validate a /run_code body -> (code, timeout_s, memory_mb); ValueError names the bad field."""
    try:
        d = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"body is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError("body must be a JSON object")
    if not isinstance(d.get("code"), str):
        raise ValueError("field 'code' is required and must be a string")
    if d.get("language", "python") != "python":
        raise ValueError(f"field 'language': {d['language']!r} is not supported (only 'python')")
    timeout = d.get("run_timeout", default_timeout)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 600:
        raise ValueError("field 'run_timeout' must be a number of seconds in (0, 600]")
    memory = d.get("memory_limit_MB", -1)
    if not isinstance(memory, int) or isinstance(memory, bool) or (memory != -1 and memory < 16):
        raise ValueError("field 'memory_limit_MB' must be an integer >= 16, or -1 for the default")
    return d["code"], float(timeout), default_memory if memory == -1 else memory


def make_server(host: str, port: int, sandbox: Sandbox, max_inflight: int = 64) -> ThreadingHTTPServer:
    slots = threading.BoundedSemaphore(max_inflight)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path in ("/health", "/v1/ping"):
                return self._send(200, {"status": "ok", **sandbox.isolation})
            self._send(404, {"status": "SandboxError", "message": f"no route {self.path}"})

        def do_POST(self):
            if self.path != "/run_code":
                return self._send(404, {"status": "SandboxError", "message": f"no route {self.path}"})
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                code, timeout, memory = parse_request(body, sandbox.timeout_s, sandbox.memory_mb)
            except ValueError as e:
                return self._send(400, {"status": "SandboxError", "message": str(e)})
            if not slots.acquire(timeout=timeout + 30):
                return self._send(503, {"status": "SandboxError", "message": "server busy, retry later"})
            try:
                self._send(200, to_fusion(sandbox.run(code, timeout, memory)))
            finally:
                slots.release()

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


class RemoteSandbox:
    """The `Sandbox` API over HTTP, against `sandbox.py serve` or any SandboxFusion-compatible server."""

    def __init__(self, url: str, timeout_s: float = 10.0, memory_mb: int = -1, retries: int = 5,
                 backoff_s: float = 0.2, workers: int = 8):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/run_code") else "/run_code")
        self.timeout_s, self.memory_mb, self.retries, self.backoff_s = timeout_s, memory_mb, retries, backoff_s
        self._pool = ThreadPoolExecutor(workers)

    def run(self, code: str, timeout_s: float | None = None, memory_mb: int | None = None) -> ExecResult:
        timeout = timeout_s or self.timeout_s
        body = json.dumps({"code": code, "language": "python", "run_timeout": timeout,
                           "memory_limit_MB": memory_mb or self.memory_mb}).encode()
        err = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout + 30) as resp:
                    return from_fusion(json.loads(resp.read()))
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:  # our request is wrong: retrying will not help
                    raise ValueError(f"{self.url}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
                err = e
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                err = e
            time.sleep(self.backoff_s * 2 ** attempt)
        return ExecResult("killed", stderr=f"sandbox server unreachable after {self.retries + 1} tries: {err}")

    def submit(self, code: str, timeout_s: float | None = None, memory_mb: int | None = None) -> Future:
        return self._pool.submit(self.run, code, timeout_s, memory_mb)

    def run_many(self, codes: list[str]) -> list[ExecResult]:
        return [f.result() for f in [self.submit(c) for c in codes]]

    def close(self):
        self._pool.shutdown()


# =============================================================================================
def main(argv=None):
    ap = argparse.ArgumentParser(description="minitir's Python sandbox")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one file ('-' for stdin) and print the result as JSON")
    r.add_argument("file")
    s = sub.add_parser("serve", help="serve SandboxFusion-style POST /run_code")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--max-inflight", type=int, default=64)
    for p in (r, s):
        p.add_argument("--timeout", type=float, default=10.0)
        p.add_argument("--memory-mb", type=int, default=1024)
        p.add_argument("--workers", type=int, default=2)
    sub.add_parser("_forkserver")
    a = ap.parse_args(argv)
    if a.cmd == "_forkserver":
        return fork_server()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.cmd == "run":
        code = sys.stdin.read() if a.file == "-" else open(a.file).read()
        with Sandbox(a.timeout, a.memory_mb, workers=1) as sb:
            res = sb.run(code)
        print(json.dumps({**asdict(res), "text": res.text}, indent=2))
        return 0 if res.status == "ok" else 1
    with Sandbox(a.timeout, a.memory_mb, workers=a.workers) as sb:
        server = make_server(a.host, a.port, sb, a.max_inflight)
        log.info("sandbox: serving POST http://%s:%d/run_code with %d workers", a.host, server.server_port,
                 a.workers)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    sys.exit(main())
