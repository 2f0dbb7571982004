"""minitir's Python sandbox from the command line (the implementation is the package minitir.sandbox).

    python sandbox.py run FILE|-                            # one run, result as JSON
    python sandbox.py serve --host 127.0.0.1 --port 8080    # SandboxFusion-style POST /run_code

Where neither namespaces nor Landlock isolate the runs it refuses to start (exit 2);
MINITIR_SANDBOX_ALLOW_UNISOLATED=1 accepts the risk.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

from minitir.sandbox import ALLOW_UNISOLATED_ENV, Sandbox, SandboxUnavailable, make_server

log = logging.getLogger("minitir.sandbox")


def main(argv=None):
    ap = argparse.ArgumentParser(description="minitir's Python sandbox")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one file ('-' for stdin) and print the result as JSON")
    r.add_argument("file")
    s = sub.add_parser("serve", help="serve SandboxFusion-style POST /run_code")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting or running; more get 503")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger requests get 413")
    for p in (r, s):
        p.add_argument("--timeout", type=float, default=10.0)
        p.add_argument("--memory-mb", type=int, default=1024)
        p.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return serve_or_run(a, ap, allow=os.environ.get(ALLOW_UNISOLATED_ENV) == "1")
    except SandboxUnavailable as e:
        ap.exit(2, f"sandbox.py: {e}\n")


def serve_or_run(a, ap, allow: bool):
    if a.cmd == "run":
        try:
            code = sys.stdin.read() if a.file == "-" else open(a.file).read()
        except OSError as e:
            ap.exit(2, f"sandbox.py: {a.file}: {e.strerror}\n")
        with Sandbox(a.timeout, a.memory_mb, workers=1, allow_unisolated=allow) as sb:
            res = sb.run(code)
        print(json.dumps({**asdict(res), "text": res.text}, indent=2))
        return 0 if res.status == "ok" else 1
    with Sandbox(a.timeout, a.memory_mb, workers=a.workers, allow_unisolated=allow) as sb:
        server = make_server(a.host, a.port, sb, a.max_queue, a.max_body_bytes)
        log.info("sandbox: serving POST http://%s:%d/run_code with %d workers (%s)", a.host,
                 server.server_port, a.workers, sb.report)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    sys.exit(main())
