"""HTTP: a SandboxFusion-compatible `POST /run_code` server over a Sandbox, and `RemoteSandbox`, its client.

Under load the server stays correct: a listen backlog that holds hundreds of connections, a request body
over `max_body_bytes` answered 413 before it is read, and at most `max_queue` requests waiting or running
(more are answered 503 with Retry-After, which RemoteSandbox honours).
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from minitir.sandbox.result import STATUSES, ExecResult

log = logging.getLogger("minitir.sandbox")
_FUSION_STATUS = {"ok": "Finished", "error": "Finished", "timeout": "TimeLimitExceeded", "memory": "Finished",
                  "disk": "Finished", "killed": "Finished", "sandbox_error": "Error"}


def to_fusion(r: ExecResult) -> dict:
    status = "Success" if r.status == "ok" else "SandboxError" if r.failed else "Failed"
    return {"status": status, "message": r.stderr if r.failed else "", "compile_result": None,
            "run_result": {"status": _FUSION_STATUS[r.status], "execution_time": r.duration_s,
                           "return_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr},
            "files": {}, "minitir_status": r.status}


def from_fusion(d: dict) -> ExecResult:
    rr = d.get("run_result") or {}
    status = d.get("minitir_status")
    if status not in STATUSES:
        code = rr.get("return_code")
        status = ("sandbox_error" if d.get("status") == "SandboxError" else   # SandboxFusion: its own failure
                  "timeout" if rr.get("status") == "TimeLimitExceeded" else
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024   # the listen backlog (socketserver's default of 5 resets bursts of clients)


def make_server(host: str, port: int, sandbox, max_queue: int = 256,
                max_body_bytes: int = 1 << 20) -> ThreadingHTTPServer:
    """A server for `sandbox`: at most max_queue requests waiting or running, bodies up to max_body_bytes."""
    pending, lock = [0], threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict, headers: dict | None = None):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path in ("/health", "/v1/ping"):
                return self._send(200, {"status": "ok", **sandbox.isolation})
            self._send(404, {"status": "SandboxError", "message": f"no route {self.path}"})

        def do_POST(self):
            if self.path != "/run_code":
                return self._send(404, {"status": "SandboxError", "message": f"no route {self.path}"})
            try:
                size = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                size = -1
            if not 0 <= size <= max_body_bytes:   # answered before reading: the body never reaches memory
                self.close_connection = True
                return self._send(413, {"status": "SandboxError",
                                        "message": f"request body of {size} bytes: the limit is {max_body_bytes}"})
            try:
                code, timeout, memory = parse_request(self.rfile.read(size), sandbox.timeout_s, sandbox.memory_mb)
            except ValueError as e:
                return self._send(400, {"status": "SandboxError", "message": str(e)})
            with lock:
                full = pending[0] >= max_queue
                pending[0] += not full
            if full:
                return self._send(503, {"status": "SandboxError", "message": f"{max_queue} requests queued; retry"},
                                  {"Retry-After": "1"})
            try:
                self._send(200, to_fusion(sandbox.run(code, timeout, memory)))
            finally:
                with lock:
                    pending[0] -= 1

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

    return _Server((host, port), Handler)


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
            wait = self.backoff_s * 2 ** attempt
            try:
                with urllib.request.urlopen(req, timeout=timeout + 30) as resp:
                    return from_fusion(json.loads(resp.read()))
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:  # our request is wrong: retrying will not help
                    raise ValueError(f"{self.url}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
                err = e
                after = e.headers.get("Retry-After") if e.headers else None
                wait = max(wait, float(after)) if after and after.replace(".", "", 1).isdigit() else wait
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                err = e
            time.sleep(wait)
        return ExecResult("sandbox_error", stderr=f"sandbox server unreachable after {self.retries + 1} tries: {err}")

    def submit(self, code: str, timeout_s: float | None = None, memory_mb: int | None = None) -> Future:
        return self._pool.submit(self.run, code, timeout_s, memory_mb)

    def run_many(self, codes: list[str]) -> list[ExecResult]:
        return [f.result() for f in [self.submit(c) for c in codes]]

    def close(self):
        self._pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
