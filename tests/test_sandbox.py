"""The sandbox against hostile code: each case is followed by a normal run that must still be right, and
no process or file of the run may remain. Every test runs in each isolation mode the machine offers: as
root (mount, network and PID namespaces, a uid per worker) and as an unprivileged user (the same inside a
user namespace; on a root machine the fork servers are started as `nobody`), each with Landlock and seccomp
on top; and the whole module again in an emulated container (tests/container.py), where namespaces are
refused and Landlock and seccomp are the isolation."""
import json
import os
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from minitir.sandbox import ExecResult, RemoteSandbox, Sandbox, SandboxUnavailable, landlock, make_server
from tests.container import ENV, run_emulated

ROOT = os.geteuid() == 0
CONTAINER = os.environ.get(ENV)   # set inside the emulated container
PROJECT = Path(__file__).resolve().parents[1]
NOBODY = 65534


def _user_namespaces_work() -> bool:
    if not ROOT or CONTAINER:
        return True   # the plain sandbox is the unprivileged one; it says itself whether it is isolated
    with Sandbox(timeout_s=2, memory_mb=256, workers=1, as_user=NOBODY) as sb:
        return sb.isolation["mode"] == "user"


MODES = ["root", "user"] if ROOT else ["user"]


@pytest.fixture(scope="module", params=MODES)
def sb(request):
    if request.param == "user" and ROOT and not _user_namespaces_work():
        pytest.skip("this kernel refuses unprivileged user namespaces: the user mode cannot be tested here")
    as_user = NOBODY if request.param == "user" and ROOT else None
    with Sandbox(timeout_s=2.0, memory_mb=256, max_output_bytes=4096, workers=2, as_user=as_user) as s:
        iso = s.isolation
        assert iso["mode"] == ("landlock" if CONTAINER else request.param) and iso["network"], iso
        assert bool(iso["view"]) == (not CONTAINER) and iso["landlock"] == landlock.abi() and iso["seccomp"], iso
        yield s
    for w in s.worker_info:  # closing removes every worker's directory and process
        assert not os.path.exists(w["base_dir"]) and not os.path.exists(f"/proc/{w['pid']}")


def children_of(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def check_clean(sb):
    """Nothing of past runs is left: each fork server has only its one pre-forked spare (and that spare at
    most the run it prepared), in either mode."""
    for w in sb.worker_info:
        if os.path.exists(f"/proc/{w['pid']}"):
            kids = children_of(w["pid"])
            assert len(kids) <= 1 and all(len(children_of(k)) <= 1 for k in kids), kids
    r = sb.run("print(6 * 7)")
    assert (r.status, r.stdout) == ("ok", "42\n")


ESCAPE = f"/tmp/minitir-escape-{uuid.uuid4().hex}"
CASES = {
    "infinite loop": ("while True:\n    pass", {"timeout"}),
    "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", {"timeout"}),
    "twice memory_mb": ("x = bytearray(2 * 256 * 1024 ** 2)\nx[::4096] = b'1' * len(x[::4096])", {"memory"}),
    "recursion bomb": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)",
                       {"killed", "error", "memory", "timeout"}),
    "segfault": ("import ctypes\nctypes.string_at(0)", {"killed"}),
    "signal other processes": ("import os, signal\nseen = []\nfor pid in range(2, 4096):\n    try:\n"
                               "        os.kill(pid, 0)\n        seen.append(pid)\n    except OSError:\n        pass\n"
                               "for f in (lambda: os.kill(-1, 9), lambda: os.kill(1, 9)):\n    try:\n        f()\n"
                               "    except OSError as e:\n        print(type(e).__name__)\nprint(os.getpid(), seen)",
                               {"ok"}),
    "threads that never end": ("import threading, time\n"
                               "threading.Thread(target=lambda: time.sleep(100)).start()\nprint('main done')", {"ok"}),
    "read stdin": ("print(input())", {"error"}),
    "os._exit": ("import os\nprint('bye', flush=True)\nos._exit(3)", {"error"}),
    "process limit": ("import os, time\nn = 0\ntry:\n    for _ in range(500):\n        if os.fork() == 0:\n"
                      "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
                      "    print(type(e).__name__, n)", {"ok"}),
    "ignore SIGTERM": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(100)",
                       {"timeout"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_adversarial(sb, name):
    code, statuses = CASES[name]
    t = time.time()
    r = sb.run(code, timeout_s=1.0) if statuses == {"timeout"} else sb.run(code)   # (a shorter wait, same check)
    assert r.status in statuses, (name, r)
    assert time.time() - t < 10
    if name == "signal other processes" and not CONTAINER:   # PID 1 of its own namespace: nothing else to see
        assert r.stdout.split() == ["ProcessLookupError", "1", "[]"], r.stdout
    if name == "signal other processes" and CONTAINER and landlock.abi() >= 6:   # Landlock scopes signals: (kill(-1)
        *errors, pid, seen = r.stdout.split()           # "succeeds" having signalled nothing)
        assert errors == ["PermissionError"] and seen in ("[]", f"[{pid}]"), r.stdout
    if name == "threads that never end":
        assert r.stdout == "main done\n" and r.duration_s < 1.5
    if name == "read stdin":
        assert "EOFError" in r.stderr
    if name == "os._exit":
        assert r.exit_code == 3 and r.stdout == "bye\n"
    if name == "process limit":   # a fork bomb stops at MAX_PROCESSES in either mode (it once filled the memory)
        error, n = r.stdout.split()
        assert error == "BlockingIOError" and int(n) < 64, r.stdout
    check_clean(sb)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    """A 0600 file in a 0700 directory, in the test's temporary directory and in the invoking user's
    home: what model-written code must never read."""
    out = []
    for parent in (tmp_path_factory.mktemp("private"), Path.home()):
        d = parent / f".minitir-secret-{uuid.uuid4().hex}"
        d.mkdir(mode=0o700)
        f = d / "key"
        f.write_text("hunter2")
        f.chmod(0o600)
        out.append(f)
    yield out
    for f in out:
        f.unlink()
        f.parent.rmdir()


@pytest.mark.quick
def test_host_files_are_not_visible(sb, secrets):
    """Reads of private files, home directories, the project and its data, /etc/shadow and another
    process's environment all fail; writes outside the working directory fail or stay private."""
    reads = [str(f) for f in secrets] + ["/etc/shadow", str(PROJECT / "README.md"), str(PROJECT / "data" / "math500.jsonl"),
                                         f"/proc/{os.getpid()}/environ", "/proc/self/environ"]
    code = ("import os\nfor p in %r:\n    try:\n        print(len(open(p, 'rb').read()))\n"
            "    except OSError as e:\n        print(type(e).__name__)\n" % reads)
    r = sb.run(code)
    assert r.status == "ok" and "hunter2" not in r.stdout
    assert all(not line.isdigit() for line in r.stdout.split()), r.stdout
    for d in ("/root", str(Path.home()), "/home", str(PROJECT)):
        r = sb.run(f"import os\nprint(os.listdir({d!r}))")
        assert r.status == "error" and ("PermissionError" in r.stderr or "FileNotFoundError" in r.stderr), (d, r)
    for target in ("/x", "/usr/lib/x", "/etc/x", str(PROJECT / "x")):
        r = sb.run(f"open({target!r}, 'w').write('x')")
        assert r.status == "error", (target, r)
        assert not os.path.exists(target)
    r = sb.run(f"open({ESCAPE!r}, 'w').write('x')\nprint('written')")   # the view's own /tmp, not the host's
    assert r.stdout == ("" if CONTAINER else "written\n") and not os.path.exists(ESCAPE)   # (no view: no /tmp)
    r = sb.run(f"import os\nprint(os.path.exists({ESCAPE!r}))")          # and emptied after every run
    assert r.stdout == "False\n"
    check_clean(sb)


def test_the_users_files_keep_their_mode_times_and_length(sb):
    """A file of the uid the fork servers run as, outside the working directory, where every user can reach
    it: no run changes its mode, times or length (Landlock closes writing; where runs share that uid, as in a
    container as a normal user, seccomp closes chmod, utime and truncate, which Landlock does not cover)."""
    d = Path(f"/tmp/minitir-owned-{uuid.uuid4().hex}")
    d.mkdir(mode=0o755)
    f = d / "checkpoint.bin"
    f.write_bytes(b"weights" * 100)
    if ROOT and sb.isolation["uid"] is None:   # the fork servers run as nobody: the file is theirs
        os.chown(f, NOBODY, NOBODY)
    before = f.stat()
    try:
        r = sb.run("import os\nfor op in (lambda: os.chmod(%r, 0o777), lambda: os.utime(%r, (0, 0)),\n"
                   "           lambda: os.truncate(%r, 0)):\n    try:\n        op()\n        print('changed')\n"
                   "    except OSError as e:\n        print(type(e).__name__)" % (str(f), str(f), str(f)))
        after = f.stat()
        assert "changed" not in r.stdout and len(r.stdout.split()) == 3, r
        assert (after.st_mode, after.st_mtime_ns, after.st_size) == (before.st_mode, before.st_mtime_ns, before.st_size)
    finally:
        f.unlink()
        d.rmdir()
    check_clean(sb)


def test_flood_of_output_is_capped(sb):
    r = sb.run("import sys\nsys.stdout.write('x' * 100_000_000)")
    assert r.status == "ok" and r.stdout.startswith("x" * 4096)
    assert "output truncated: 99995904 more bytes" in r.stdout and len(r.stdout) < 4200
    check_clean(sb)


def test_daemonised_grandchild_does_not_outlive_the_run(sb):
    """A grandchild in its own session, exec'ed into `sleep` with a marker argument, must be gone when the
    run's result comes back (found by its command line, from the host)."""
    marker = f"60.{uuid.uuid4().int % 10 ** 9}"
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\n"
            "time.sleep(0.3)\nprint('parent done')\n")
    r = sb.run(code)
    assert r.stdout == "parent done\n"
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            alive += [pid] if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes() else []
        except OSError:
            pass
    assert alive == []
    check_clean(sb)


def test_no_network(sb):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    r = sb.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    assert r.status == "error" and "PermissionError: [Errno 1] Operation not permitted" in r.stderr, r   # seccomp
    with pytest.raises(socket.timeout):
        srv.accept()
    srv.close()
    check_clean(sb)


@pytest.mark.quick
def test_work_directory_is_fresh_and_removed(sb):
    r = sb.run("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(os.listdir('.'))")
    cwd, listing = r.stdout.splitlines()
    assert listing == "['scratch.txt']"
    r = sb.run(f"import os\nprint(os.path.exists({cwd!r}))")   # gone for the next run
    assert r.stdout == "False\n"


@pytest.mark.quick
def test_notebook_value_and_short_tracebacks(sb):
    assert sb.run("x = 3\nx * 14").stdout == "42\n"
    assert sb.run("print('a')\n5").stdout == "a\n"              # something printed: no echo
    assert sb.run("x = 1").stdout == ""
    r = sb.run("def f(x):\n    return 1 / x\nf(0)")
    assert r.status == "error" and "ZeroDivisionError" in r.text
    assert "sandbox.py" not in r.stderr and "/root" not in r.stderr and 'File "<code>", line 2' in r.stderr
    r = sb.run("def f(:\n")
    assert r.status == "error" and "SyntaxError" in r.stderr
    r = sb.run("import sympy\nsympy.factorint(2 ** 64 - 1)")
    assert r.status == "ok" and "6700417" in r.stdout


def test_run_many_in_order_with_two_workers(sb):
    codes, expect = [], []
    for i in range(200):
        kind = i % 5
        if kind == 0:
            codes.append(f"print({i} ** 2)"), expect.append(("ok", f"{i * i}\n"))
        elif kind == 1:
            codes.append(f"raise ValueError({i})"), expect.append(("error", ""))
        elif kind == 2:
            codes.append(f"import math\nmath.factorial({i})"), expect.append(("ok", f"{__import__('math').factorial(i)}\n"))
        elif kind == 3 and i in (3, 163):   # one early, one late: the order holds around a timeout
            codes.append("while True: pass"), expect.append(("timeout", ""))
        else:
            codes.append(f"import os\nos._exit({i % 7 + 1})"), expect.append(("error", ""))
    results = sb.run_many(codes)
    assert [(r.status, r.stdout) for r in results] == expect
    check_clean(sb)


def test_a_set_prints_in_one_order_on_every_worker(sb):
    """A deterministic program gives one output on every worker and in every run: one hash seed (0) for all
    (strings hash randomly per interpreter otherwise, and a set's order follows the hashes)."""
    import subprocess
    import sys
    code = "print({'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'})"
    outs = {r.stdout for r in sb.run_many([code] * 16)}
    seed0 = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "0"}).stdout
    assert outs == {seed0}


# ------------------------------------------------------------------------------------------------
# nothing shared between runs; one memory and disk budget per run, over all its processes
# ------------------------------------------------------------------------------------------------
SYSV = """import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
def made(what, ident):
    print(what, 'refused' if ident < 0 else 'made', os.strerror(ctypes.get_errno()) if ident < 0 else '')
    return ident
shm = made('shm', libc.shmget({key}, 4096, 0o1666))
if shm >= 0:
    p = libc.shmat(shm, None, 0)
    print('shm holds', ctypes.string_at(p, 6))
    ctypes.memmove(p, b'secret', 6)
msg = made('msg', libc.msgget({key}, 0o1666))
if msg >= 0:
    buf = ctypes.create_string_buffer(64)
    got = libc.msgrcv(msg, buf, 56, 0, 0o4000)   # IPC_NOWAIT
    print('msg holds', buf.raw[8:8 + max(got, 0)])
    libc.msgsnd(msg, ctypes.c_char_p(b'\\1\\0\\0\\0\\0\\0\\0\\0secret'), 6, 0)
made('sem', libc.semget({key}, 1, 0o1666))
"""
POSIX = """import ctypes, os
from multiprocessing import shared_memory
try:
    m = shared_memory.SharedMemory('{name}', create=False)
    print('shm holds', bytes(m.buf[:6]))
except FileNotFoundError:
    try:
        m = shared_memory.SharedMemory('{name}', create=True, size=4096)
        m.buf[:6] = b'secret'
        print('shm made')
    except OSError as e:
        print('shm refused', type(e).__name__)
rt = ctypes.CDLL('librt.so.1', use_errno=True)
q = rt.mq_open(b'/{name}', 0o4000 | 0o100 | 2, 0o666, None)   # O_NONBLOCK | O_CREAT | O_RDWR
if q < 0:
    print('mq refused', os.strerror(ctypes.get_errno()))
else:
    buf = ctypes.create_string_buffer(8192)
    got = rt.mq_receive(q, buf, 8192, None)
    print('mq holds', buf.raw[:max(got, 0)])
    rt.mq_send(q, b'secret', 6, 0)
"""


def _host_ipc_keys() -> set[int]:
    keys = set()
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            keys |= {int(line.split()[0]) for line in list(f)[1:]}
    return keys


@pytest.mark.quick
def test_ipc_objects_of_one_run_never_reach_the_next(sb):
    """System V shared memory, message queues and semaphores, POSIX shared memory and message queues: a run
    that makes one and writes "secret" to it, then the next runs: none finds it. With namespaces each run
    has an IPC namespace of its own, emptied before it ends; without (a container), the calls that make or
    attach them fail (seccomp) and /dev/shm is closed (Landlock). Nothing is left on the host."""
    key, name = 0x5EC + os.getpid(), f"minitir-{uuid.uuid4().hex[:12]}"
    before = _host_ipc_keys()
    for code in (SYSV.format(key=key), POSIX.format(name=name)):
        outs = [r.stdout for r in sb.run_many([code] * 4)]
        assert all("secret" not in o for o in outs), outs
        if CONTAINER:
            assert all(o.count("refused") == o.count("\n") for o in outs), outs
        elif code.startswith("import ctypes, os\nlibc"):   # System V: private, so allowed where a control
            watched = not sb.worker_info[0]["groups"]        # group counts its memory (POSIX: no /dev/shm)
            assert all(("refused" in o) == watched for o in outs), outs
    assert _host_ipc_keys() <= before and key not in _host_ipc_keys()
    assert not os.path.exists(f"/dev/shm/{name}") and not os.path.exists(f"/dev/mqueue/{name}")
    check_clean(sb)


@pytest.mark.quick
def test_remove_ipc_objects_empties_the_namespace():
    """The shim's clean-up, in a child with an IPC namespace of its own: every object found and removed."""
    import ctypes
    from minitir.sandbox import isolation
    if not ROOT or CONTAINER:
        pytest.skip("needs unshare(CLONE_NEWIPC) as root")
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.unshare(isolation.CLONE_NEWIPC) == 0
        made = [libc.shmget(k, 4096, 0o1600) for k in (1, 2)] + [libc.msgget(3, 0o1600), libc.semget(4, 2, 0o1600)]
        gone, again = isolation.remove_ipc_objects(), isolation.remove_ipc_objects()
        os._exit(0 if ok and min(made) >= 0 and (gone, again) == (4, 0) else 1)
    assert os.waitpid(pid, 0)[1] == 0


SWARM = ("import os, time\nkids = []\nfor _ in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
         "        x = bytearray(100 * 2 ** 20)\n        x[::4096] = b'1' * len(x[::4096])\n        time.sleep(5)\n"
         "        os._exit(0)\n    kids.append(pid)\nfor k in kids:\n    os.waitpid(k, 0)\nprint('all done')")
FORKS_WITHIN = ("import os, sympy\nx = sympy.symbols('x')\nkids = []\nfor i in range(12):\n    pid = os.fork()\n"
                "    if pid == 0:\n        for n in range(20):\n            sympy.factor(x ** (n + 4) - 1)\n"
                "        os._exit(0)\n    kids.append(pid)\nfor k in kids:\n    os.waitpid(k, 0)\nprint(len(kids))")
DISK = ("import os\nfor i in range(24):\n    with open(f'f{i}', 'wb') as f:\n        f.write(b'x' * 15 * 2 ** 20)\n"
        "print('wrote 360 MB')")


@pytest.mark.quick
def test_one_memory_budget_over_all_processes(sb):
    """Six processes of 100 MB each against memory_mb=256 (each far below its own address-space limit): the
    run ends with status "memory" within a second, and the next run is unaffected. Twelve processes that
    compute with what the fork server preloaded stay within the budget (it counts what they add, not what
    they share)."""
    t = time.time()
    r = sb.run(SWARM)
    assert r.status == "memory" and "all done" not in r.stdout and time.time() - t < 3, r
    assert "memory budget" in r.stderr and "MemoryError" in r.text
    check_clean(sb)
    r = sb.run(FORKS_WITHIN)
    assert (r.status, r.stdout) == ("ok", "12\n"), r


@pytest.mark.quick
def test_one_disk_budget_per_run(sb):
    """360 MB of files against a 256 MB budget: a tmpfs of that size refuses the writes (status "error",
    "No space left"), or without one the watcher stops the run (status "disk"); where a control group counts
    the files' pages as the run's memory (tmpfs, page cache) they may pass memory_mb first (status
    "memory"). The directory is removed and the next run has its whole budget."""
    r = sb.run(DISK)
    assert "wrote" not in r.stdout
    stopped = {("disk", False)} if CONTAINER else {("error", True)}   # or files in memory over its budget:
    assert (r.status, "No space left on device" in r.stderr) in stopped | {("memory", False)}, r   # a cgroup counts them
    check_clean(sb)
    r = sb.run("with open('f', 'wb') as f:\n    f.write(b'x' * 15 * 2 ** 20)\nprint('ok')")
    assert (r.status, r.stdout) == ("ok", "ok\n"), r


@pytest.mark.quick
def test_every_worker_says_what_bounds_a_run(sb):
    """The report names what bounds each run as a whole: a control group where the fork server could make
    one (here: as root), else the watcher; the disk by a tmpfs with a private view, else by the watcher."""
    for w in sb.worker_info:
        assert ("cgroup" in w["bounds"]) == bool(w["groups"]) and ("watcher summing" in w["bounds"]) != bool(w["groups"])
        assert ("disk by a tmpfs" in w["bounds"]) == (not CONTAINER)
    if ROOT and not CONTAINER and sb.isolation["mode"] == "root":
        assert sb.isolation["groups"], sb.isolation["no_groups"]   # this project's machines: cgroup v1, as root
    assert sb.isolation["bounds"] in sb.report


def test_a_worker_whose_isolation_is_weaker_stops_the_sandbox(monkeypatch):
    """Every worker's isolation is checked, not only the first's: one that is not contained refuses."""
    from minitir.sandbox import pool
    start = pool._Worker.start
    calls = []

    def start_weaker(self):
        hello = start(self)
        calls.append(1)
        return {**hello, "view": None, "landlock": 0} if len(calls) == 2 else hello
    monkeypatch.setattr(pool._Worker, "start", start_weaker)
    with pytest.raises(SandboxUnavailable):
        Sandbox(timeout_s=2, workers=2)


@pytest.mark.quick
def test_cgroup_v2_files(tmp_path):
    """The v2 names of the budget (the machines here have v1): memory.max, no swap, pids.max, OOM kills
    counted from memory.events; v1: memsw raised before memory, lowered after."""
    from minitir.sandbox.budget import Groups
    for v2 in (True, False):
        base = tmp_path / ("v2" if v2 else "v1")
        g = Groups([str(base / "g-slot")] if v2 else [str(base / "m-slot"), str(base / "p-slot")], v2)
        for d in g.slot_dirs(1):
            os.makedirs(d)
        mem = Path(g.slot_dirs(1)[0])
        if v2:
            (mem / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
        else:
            (mem / "memory.limit_in_bytes").write_text("1000")
            (mem / "memory.memsw.limit_in_bytes").write_text("1000")
            (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        g.set_limit(1, 2 ** 28, 65)
        files = {f.name: f.read_text() for d in g.slot_dirs(1) for f in Path(d).iterdir()}
        if v2:
            assert (files["memory.max"], files["memory.swap.max"], files["pids.max"]) == (str(2 ** 28), "0", "65")
        else:
            assert files["memory.limit_in_bytes"] == files["memory.memsw.limit_in_bytes"] == str(2 ** 28)
        assert g.oom_kills(1) == 2


@pytest.mark.quick
def test_thread_safety_and_futures(sb):
    futs = [sb.submit(f"print({i})") for i in range(20)]
    assert [f.result().stdout for f in futs] == [f"{i}\n" for i in range(20)]


@pytest.mark.quick
def test_sandboxfusion_server_and_client_survive_restart(sb):
    server = make_server("127.0.0.1", 0, sb)
    port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{port}/run_code"
    body = json.dumps({"code": "print('hi')", "language": "python", "run_timeout": 5, "memory_limit_MB": 256})
    with urllib.request.urlopen(urllib.request.Request(url, data=body.encode())) as resp:
        d = json.loads(resp.read())
    assert d["status"] == "Success" and d["run_result"]["status"] == "Finished"
    assert d["run_result"]["stdout"] == "hi\n" and d["run_result"]["return_code"] == 0
    assert isinstance(d["run_result"]["execution_time"], float)
    for bad, reason in (("{", "not valid JSON"), ('{"language": "python"}', "'code' is required"),
                        ('{"code": "1", "language": "cpp"}', "'language'"),
                        ('{"code": "1", "run_timeout": -1}', "'run_timeout'")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, data=bad.encode()))
        assert e.value.code == 400 and reason in json.loads(e.value.read())["message"]
    client = RemoteSandbox(f"http://127.0.0.1:{port}", retries=6, backoff_s=0.1)
    assert client.run("1 + 1").stdout == "2\n"
    assert client.run("while True: pass", timeout_s=1).status == "timeout"
    server.shutdown()
    server.server_close()

    def restart():
        time.sleep(0.5)
        s2 = make_server("127.0.0.1", port, sb)
        threading.Thread(target=s2.serve_forever, daemon=True).start()
        restarted.append(s2)

    restarted = []
    threading.Thread(target=restart).start()
    r = client.run("print('back')")
    assert r.status == "ok" and r.stdout == "back\n"
    restarted[0].shutdown()
    restarted[0].server_close()
    with RemoteSandbox(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01) as dead:   # Sandbox's `with` too
        gone = dead.run("1")
    assert dead._pool._shutdown and gone.status == "sandbox_error" and gone.failed and "unreachable" in gone.stderr


@pytest.mark.quick
def test_emptying_a_directory_skips_an_entry_that_resists_not_the_rest(tmp_path):
    """After a run, its files in the view's /tmp (or, without a view, the shared /tmp) are removed entry by
    entry: one whose stat or removal fails (it vanished, or a race) must not leave the others behind."""
    from minitir.sandbox.forkserver import _empty
    for name in ("a", "b", "c", "keep"):
        (tmp_path / name).write_text(name)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")

    def pick(entry):
        if entry.name == "b":
            raise FileNotFoundError(entry.path)
        return entry.name != "keep"
    _empty(str(tmp_path), pick)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "keep"]


def test_a_worker_that_cannot_start_leaves_none_running(monkeypatch):
    from minitir.sandbox import pool
    started, start = [], pool._Worker.start

    def second_fails(w):
        started.append(w)
        if len(started) == 2:
            raise RuntimeError("a sandbox worker failed to start")
        return start(w)
    monkeypatch.setattr(pool._Worker, "start", second_fails)
    with pytest.raises(RuntimeError, match="failed to start"):
        Sandbox(timeout_s=2, workers=2)
    assert len(started) == 2 and all(w.proc is None for w in started)   # the one that started was stopped


@pytest.mark.quick
def test_the_trainers_remote_sandbox_sends_its_limits(monkeypatch):
    """--sandbox-url with --sandbox-timeout-s / --sandbox-memory-mb: each request carries both (the memory
    limit was once left at -1, the server's default)."""
    import io
    from minitir.rollout import make_tool
    sent = []

    def urlopen(req, timeout):
        sent.append(json.loads(req.data))
        return io.BytesIO(json.dumps({"status": "Success", "run_result": {"status": "Finished", "stdout": "2\n",
                                                                          "stderr": "", "return_code": 0}}).encode())
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    tool = make_tool("http://sandbox.invalid:8080", timeout_s=3.0, memory_mb=300, workers=2)
    assert tool.run("print(1 + 1)").stdout == "2\n"
    assert sent == [{"code": "print(1 + 1)", "language": "python", "run_timeout": 3.0, "memory_limit_MB": 300}]
    tool.close()


def test_a_worker_that_dies_is_a_sandbox_error_not_a_code_error():
    """A fork server killed under a run: the run is the sandbox's failure (status sandbox_error, `failed`),
    never a result the code could have produced; the next run gets a fresh worker. Over HTTP the status
    survives (minitir's field, or SandboxFusion's own "SandboxError")."""
    import signal
    from minitir.sandbox import from_fusion, to_fusion
    with Sandbox(timeout_s=10, workers=1) as sb:
        fut = sb.submit("import time\ntime.sleep(5)")
        time.sleep(1.0)
        os.killpg(sb._workers[0].proc.pid, signal.SIGKILL)
        r = fut.result()
        assert r.status == "sandbox_error" and r.failed and r.error and "died" in r.stderr
        again = sb.run("print(1)")
        assert again.stdout == "1\n", again   # (failed once in ~7 suites, as '': its status and stderr say why)
    back = from_fusion(json.loads(json.dumps(to_fusion(r))))
    assert back.status == "sandbox_error" and back.failed
    assert from_fusion({"status": "SandboxError", "message": "runner crashed", "run_result": None}).failed
    assert not ExecResult("killed").failed and not ExecResult("error").failed


@pytest.mark.quick
def test_exec_result_text():
    assert ExecResult("timeout").text == "TimeoutError: the code ran past its time limit"
    assert ExecResult("ok", stdout="1\n").text == "1"
    assert ExecResult("memory", stderr="MemoryError: x\n").text == "MemoryError: x"


def serve(sb, **kw):
    server = make_server("127.0.0.1", 0, sb, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_server_answers_64_concurrent_raw_clients(sb):
    """192 requests from 64 clients at once, none retrying: every answer correct, no connection reset."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor
    server = serve(sb)

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=60)
        conn.request("POST", "/run_code", json.dumps({"code": f"print({i} * {i})", "language": "python"}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        return resp.status, body["run_result"]["stdout"]

    try:
        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(one, range(192)))
        assert answers == [(200, f"{i * i}\n") for i in range(192)]
    finally:
        server.shutdown()
        server.server_close()


def test_server_refuses_huge_bodies_and_sheds_load(sb):
    """A body over the limit is answered 413 before it is read; past max_queue requests get 503 with
    Retry-After, which the client honours until it gets through."""
    server = serve(sb, max_queue=1, max_body_bytes=1000)
    port = server.server_port
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:   # announces 100 GB, sends nothing
            s.sendall(b"POST /run_code HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.0 413")
        slow = threading.Thread(target=lambda: RemoteSandbox(f"http://127.0.0.1:{port}", retries=0).run(
            "import time\ntime.sleep(1.5)"))
        slow.start()
        time.sleep(0.5)
        body = json.dumps({"code": "1", "language": "python"}).encode()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/run_code", data=body))
        assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"
        r = RemoteSandbox(f"http://127.0.0.1:{port}", retries=5, backoff_s=0.05).run("print('through')")
        assert r.stdout == "through\n"
        slow.join()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(bool(CONTAINER), reason="about the private view, which a container refuses")
def test_python_installed_under_tmp():
    """An interpreter whose prefix lies under /tmp (a venv there, as benchmarks make): the view's fresh /tmp
    must neither fail to build over it (no isolation at all) nor lose it when /tmp is emptied after a run."""
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        venv = Path(d) / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
        code = ("import json\nfrom minitir.sandbox import Sandbox\n"
                "with Sandbox(timeout_s=5, memory_mb=512, workers=1) as sb:\n"
                "    runs = [sb.run('import sys, sympy\\nopen(\"/tmp/x\", \"w\").write(\"1\")\\n"
                "print(sys.prefix, sympy.Integer(2) ** 10)') for _ in range(2)]\n"
                "    print(json.dumps([sb.isolation, [(r.status, r.stdout, r.stderr) for r in runs]]))\n")
        out = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=PROJECT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        iso, runs = json.loads(out.stdout.splitlines()[-1])
        assert iso["view"] and not iso["problem"], iso
        assert runs == [["ok", f"{venv} 1024\n", ""]] * 2, runs


# ------------------------------------------------------------------------------------------------
# containers: namespaces refused
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(bool(CONTAINER), reason="already inside the emulated container")
def test_the_hostile_suite_in_an_emulated_container():
    """This module again where a container's seccomp profile refuses namespaces (tests/container.py):
    Landlock and seccomp alone contain every case, as root and as a user (on this kernel's Landlock ABI).
    Left out: HTTP, and the order of a 200-run batch (the pool's bookkeeping, the same in every mode)."""
    args = ['-q', '-p', 'no:cacheprovider', 'tests/test_sandbox.py', '-k', 'not server and not run_many_in_order']
    r = run_emulated(f"import pytest\nsys.exit(pytest.main({args!r}))")
    tail = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0 and " passed" in tail and "failed" not in tail, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.skipif(bool(CONTAINER), reason="already inside the emulated container")
def test_where_nothing_isolates_no_code_runs():
    """Namespaces and Landlock both refused: Sandbox refuses in one line naming the flags that accept the
    risk, runs code only when told to; train.py and eval.py exit 2 with that line before loading a model
    (the model named does not exist: loading it first would fail with another message)."""
    r = run_emulated(
        "from minitir.sandbox import Sandbox, SandboxUnavailable\n"
        "try:\n    Sandbox(timeout_s=2, workers=1)\nexcept SandboxUnavailable as e:\n    print('refused:', e)\n"
        "with Sandbox(timeout_s=2, workers=1, allow_unisolated=True) as sb:\n"
        "    print(sb.report)\n    print(sb.run('print(6 * 7)').stdout.strip())\n", landlock=False)
    refused, report, answer = r.stdout.strip().splitlines()
    assert refused.startswith("refused: sandbox: nothing isolates") and "--sandbox-allow-unisolated" in refused
    assert report.startswith("isolation: seccomp; per run: ") and "; NOT ISOLATED:" in report, report
    assert answer == "42", r.stdout + r.stderr
    for script, args in (("train.py", ["--model", "/nonexistent/model", "--steps", "1"]),
                         ("eval.py", ["--model", "/nonexistent/model", "--benchmarks", "gsm8k"]),
                         ("sandbox.py", ["run", "/dev/null"])):
        r = run_emulated(f"import runpy\nsys.argv = [{script!r}] + {args!r}\nrunpy.run_path({script!r}, run_name='__main__')",
                         landlock=False)
        assert r.returncode == 2 and "nothing isolates" in r.stderr and "Traceback" not in r.stderr, (script, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
