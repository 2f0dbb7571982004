"""Isolated Python execution for model-written code, in layers a reader can audit one at a time:

    result.py      ExecResult: what a run produced, and the text the model sees of it
    child.py       inside a run: notebook-style execution, short tracebacks
    isolation.py   namespaces, the private filesystem view, dropping privileges; what isolates the runs
    landlock.py    the filesystem, TCP, signals and abstract sockets closed to each run, with or without namespaces
    seccomp.py     the system calls each run may not make (ptrace, mounts, namespaces, sockets, ...)
    budget.py      one memory, process and disk budget per run over all its processes: cgroups or a watcher
    forkserver.py  the worker process: warm imports, one pre-forked child per run, reaping, rlimits
    pool.py        the host side: Sandbox, a thread-safe pool of fork servers with futures
    http.py        a SandboxFusion-compatible server (`python sandbox.py serve`) and RemoteSandbox

    from minitir.sandbox import Sandbox
    with Sandbox(timeout_s=5, memory_mb=512, workers=2) as sb:
        r = sb.run("print(2**100)")            # ExecResult(status='ok', stdout='1267...\\n', ...)
        fut = sb.submit("import sympy; sympy.factorint(2**64-1)")   # non-blocking
"""
from minitir.sandbox.http import RemoteSandbox, from_fusion, make_server, to_fusion
from minitir.sandbox.pool import ALLOW_UNISOLATED_ENV, Sandbox, SandboxUnavailable
from minitir.sandbox.result import STATUSES, ExecResult

__all__ = ["Sandbox", "SandboxUnavailable", "ALLOW_UNISOLATED_ENV", "RemoteSandbox", "ExecResult", "STATUSES",
           "make_server", "to_fusion", "from_fusion"]
