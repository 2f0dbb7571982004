"""The sandbox against hostile code: each case is followed by a normal run that must still be right, and
no process or file of the run may remain."""
import json
import os
import socket
import threading
import time
import urllib.request
import uuid

import pytest

from sandbox import ExecResult, RemoteSandbox, Sandbox, make_server

ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def sb():
    with Sandbox(timeout_s=2.0, memory_mb=256, max_output_bytes=4096, workers=2) as s:
        yield s
    for w in s.worker_info:  # closing removes every worker's directory and process
        assert not os.path.exists(w["base_dir"]) and not os.path.exists(f"/proc/{w['pid']}")


def procs_of_uid(uid):
    """[(pid, ppid)] of the processes whose real uid is `uid`."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if int(fields["Uid"].split()[0]) == uid:
                out.append((int(pid), int(fields["PPid"])))
    return out


def check_clean(sb):
    """Nothing of past runs is left: each worker's uid owns at most its one pre-forked spare child."""
    for w in sb.worker_info:
        if w["uid"] is not None:
            procs = procs_of_uid(w["uid"])
            assert len(procs) <= 1 and all(ppid == w["pid"] for _, ppid in procs), procs
    r = sb.run("print(6 * 7)")
    assert (r.status, r.stdout) == ("ok", "42\n")


ESCAPE = f"/tmp/minitir-escape-{uuid.uuid4().hex}"
CASES = {
    "infinite loop": ("while True:\n    pass", {"timeout"}),
    "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", {"timeout"}),
    "10 GB allocation": ("x = bytearray(10 * 1024 ** 3)", {"memory"}),
    "recursion bomb": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)",
                       {"killed", "error", "memory", "timeout"}),
    "segfault": ("import ctypes\nctypes.string_at(0)", {"killed"}),
    "files outside": (f"open('{ESCAPE}', 'w').write('x')\nopen('/dev/shm/{os.path.basename(ESCAPE)}', 'w')\n"
                      "open('/root/minitir-evil', 'w')", {"error"}),
    "kill the parent": ("import os, signal\nfor f in (lambda: os.kill(os.getppid(), 9), "
                        "lambda: os.killpg(os.getpgid(os.getppid()), 9), lambda: os.kill(1, 9)):\n"
                        "    try:\n        f()\n    except OSError as e:\n        print(type(e).__name__)", {"ok"}),
    "threads that never end": ("import threading, time\n"
                               "threading.Thread(target=lambda: time.sleep(100)).start()\nprint('main done')", {"ok"}),
    "read stdin": ("print(input())", {"error"}),
    "os._exit": ("import os\nprint('bye', flush=True)\nos._exit(3)", {"error"}),
    "ignore SIGTERM": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(100)",
                       {"timeout"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_adversarial(sb, name):
    code, statuses = CASES[name]
    t = time.time()
    r = sb.run(code)
    assert r.status in statuses, (name, r)
    assert time.time() - t < 10
    if name == "files outside":
        assert not os.path.exists(ESCAPE) and not os.path.exists(f"/dev/shm/{os.path.basename(ESCAPE)}")
        assert not os.path.exists("/root/minitir-evil")
    if name == "kill the parent":
        assert r.stdout.split() == ["PermissionError"] * 3 if ROOT else True
    if name == "threads that never end":
        assert r.stdout == "main done\n" and r.duration_s < 1.5
    if name == "read stdin":
        assert "EOFError" in r.stderr
    if name == "os._exit":
        assert r.exit_code == 3 and r.stdout == "bye\n"
    check_clean(sb)


def test_flood_of_output_is_capped(sb):
    r = sb.run("import sys\nsys.stdout.write('x' * 100_000_000)")
    assert r.status == "ok" and r.stdout.startswith("x" * 4096)
    assert "output truncated: 99995904 more bytes" in r.stdout and len(r.stdout) < 4200
    check_clean(sb)


def test_daemonised_grandchild_does_not_outlive_the_run(sb):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        print(os.getpid(), flush=True)\n        time.sleep(60)\n    os._exit(0)\n"
            "time.sleep(0.3)\n")
    r = sb.run(code)
    pid = int(r.stdout.split()[0])
    assert not os.path.exists(f"/proc/{pid}")
    check_clean(sb)


@pytest.mark.skipif(not ROOT, reason="network namespaces need root")
def test_no_network(sb):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    r = sb.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    assert r.status == "error" and ("unreachable" in r.stderr or "refused" in r.stderr)
    with pytest.raises(socket.timeout):
        srv.accept()
    srv.close()
    check_clean(sb)


def test_work_directory_is_fresh_and_removed(sb):
    r = sb.run("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(os.listdir('.'))")
    cwd, listing = r.stdout.splitlines()
    assert listing == "['scratch.txt']" and not os.path.exists(cwd)


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
        elif kind == 3 and i % 40 == 3:
            codes.append("while True: pass"), expect.append(("timeout", ""))
        else:
            codes.append(f"import os\nos._exit({i % 7 + 1})"), expect.append(("error", ""))
    results = sb.run_many(codes)
    assert [(r.status, r.stdout) for r in results] == expect
    check_clean(sb)


def test_thread_safety_and_futures(sb):
    futs = [sb.submit(f"print({i})") for i in range(20)]
    assert [f.result().stdout for f in futs] == [f"{i}\n" for i in range(20)]


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
    dead = RemoteSandbox(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01)
    assert dead.run("1").status == "killed"


def test_exec_result_text():
    assert ExecResult("timeout").text == "TimeoutError: the code ran past its time limit"
    assert ExecResult("ok", stdout="1\n").text == "1"
    assert ExecResult("memory", stderr="MemoryError: x\n").text == "MemoryError: x"
