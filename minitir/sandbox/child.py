"""Inside the run: the user's code executed notebook-style (the value of a last bare expression is printed
when nothing else was), its errors reported as a short traceback of its own frames only."""
from __future__ import annotations

import ast
import sys
from contextlib import suppress

MEMORY_EXIT = 86           # the child's exit code for MemoryError


class _Counting:
    """stdout wrapper remembering whether anything was printed (for the notebook-style last value)."""

    def __init__(self, stream):
        self.stream, self.wrote = stream, False

    def write(self, s):
        self.wrote = self.wrote or bool(s)
        return self.stream.write(s)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def short_traceback(exc: BaseException) -> str:
    """The traceback restricted to the user's own frames: no sandbox frames, no host paths."""
    import traceback
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(type(exc), exc))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<code>"]
    lines = traceback.format_list(frames)
    return "Traceback (most recent call last):\n" + "".join(lines) + \
        "".join(traceback.format_exception_only(type(exc), exc))


def run_user_code(code: str) -> int:
    """Execute code with fds 0/1/2 as stdin/stdout/stderr -> the process's exit status."""
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
            sys.stderr.write(short_traceback(e))
        except MemoryError:
            status = MEMORY_EXIT
        else:
            status = 1
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    return status
