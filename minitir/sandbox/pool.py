"""The host side: a pool of fork servers, thread-safe, with futures."""
from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

from minitir.sandbox.forkserver import read_msg, write_msg
from minitir.sandbox.isolation import Isolation
from minitir.sandbox.result import ExecResult

log = logging.getLogger("minitir.sandbox")
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])   # the directory holding minitir/
ALLOW_UNISOLATED_ENV = "MINITIR_SANDBOX_ALLOW_UNISOLATED"   # =1: `sandbox.py` runs code even where nothing isolates it


class SandboxUnavailable(RuntimeError):
    """Nothing on this machine keeps model-written code from the user's files: no code is run."""


def worker_env() -> dict:
    """The fork server's environment: what Python needs, nothing else of the host's (no tokens, no keys)."""
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": path,
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}   # one hash seed: a set prints alike on every worker
    if "HOME" in os.environ:   # Python finds the user's site-packages from it
        env["HOME"] = os.environ["HOME"]
    return env


class _Worker:
    def __init__(self, as_user: int | None):
        self.proc, self.base_dir, self.as_user, self.groups, self.report = None, None, as_user, [], None

    def start(self) -> dict:
        cmd = [sys.executable, "-u", "-m", "minitir.sandbox.forkserver"]
        cmd += ["--as-user", str(self.as_user)] if self.as_user is not None else []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True, env=worker_env(), cwd="/")
        hello = read_msg(self.proc.stdout)
        if not hello:
            raise RuntimeError(f"a sandbox worker ({' '.join(cmd)}) failed to start")
        self.base_dir, self.groups = hello["base_dir"], hello["groups"]
        report = _isolation(hello).report()
        if self.report is not None and report != self.report:   # a restarted worker isolates as it did
            self.stop()
            raise RuntimeError(f"a restarted sandbox worker is isolated otherwise: {report} (was: {self.report})")
        self.report = report
        return hello

    def run(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        result: list = []

        def talk():
            write_msg(self.proc.stdin, req)
            result.append(read_msg(self.proc.stdout))

        t = threading.Thread(target=talk, daemon=True)
        t.start()
        t.join(float(req["timeout_s"]) + 30)  # the fork server enforces the deadline; this guards the server
        if not result or result[0] is None:
            self.stop()
            return dict(status="sandbox_error", stdout="", stderr="sandbox worker died", exit_code=None, duration_s=0.0)
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
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        for d in self.groups:   # left by a fork server that was killed (its spare and run die with it)
            with suppress(OSError):
                os.rmdir(d)
        self.proc = None


def _isolation(hello: dict) -> Isolation:
    return Isolation(**{k: v for k, v in hello.items() if k in Isolation.__dataclass_fields__})


_warned = set()


class Sandbox:
    """A pool of `workers` fork servers. Thread-safe; `submit` returns a Future without blocking.

    Fails closed: where neither namespaces with a private view nor Landlock close the filesystem to the
    runs, it raises SandboxUnavailable, unless allow_unisolated accepts the risk (then it warns once).

    as_user (root only): start the fork servers as this unprivileged uid, which then isolate themselves as
    any normal user's would (a user namespace): how the tests check the non-root path on a root machine."""

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_bytes: int = 16384,
                 workers: int = 2, as_user: int | None = None, allow_unisolated: bool = False):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.timeout_s, self.memory_mb, self.max_output_bytes = timeout_s, memory_mb, max_output_bytes
        self._q: queue.Queue = queue.Queue()
        self._workers = [_Worker(as_user) for _ in range(workers)]
        with ThreadPoolExecutor(workers) as pool:   # they start in parallel
            starts = [pool.submit(w.start) for w in self._workers]
        try:
            hellos = [f.result() for f in starts]
        except Exception:   # none is left running
            for w in self._workers:
                w.stop()
            raise
        self.isolation, self.worker_info = hellos[0], hellos
        isos = [_isolation(h) for h in hellos]   # every worker's, not only the first's
        iso = next((i for i in isos if not i.contained), isos[0])
        self.report = iso.report()
        if len({i.report() for i in isos}) > 1:
            self.report += " (" + " | ".join(f"worker {n}: {i.report()}" for n, i in enumerate(isos)) + ")"
        if not iso.contained and not allow_unisolated:
            for w in self._workers:
                w.stop()
            raise SandboxUnavailable(
                f"sandbox: nothing isolates model-written code here ({iso.problem}); accept the risk with "
                f"--sandbox-allow-unisolated (train.py, eval.py), Sandbox(allow_unisolated=True) or "
                f"{ALLOW_UNISOLATED_ENV}=1 (sandbox.py)")
        for problem in dict.fromkeys(i.problem for i in isos if i.problem):   # every worker's, once per process
            if problem not in _warned:
                _warned.add(problem)
                log.warning("sandbox: NOT ISOLATED: %s", problem)
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
            except Exception as e:  # never lose a run: report the sandbox's failure
                fut.set_result(ExecResult("sandbox_error", stderr=f"sandbox failure: {e}"))
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
