"""Command lines that fail in one line: flags parsed by tyro from a config dataclass, and every input error
(a bad flag or value, a malformed data file, an unknown benchmark, a missing checkpoint, a bad config)
printed as one line naming what to change, with exit status 2 and no traceback."""
from __future__ import annotations

import contextlib
import io
import sys

import tyro


class UsageError(ValueError):
    """Bad input on the command line."""


def parse(cls, args: list[str], default=None, description: str = ""):
    """tyro.cli, with tyro's boxed error message condensed into a UsageError of one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(cls, args=args, default=default, description=description)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        raise UsageError(condense(err.getvalue())) from None


def condense(message: str) -> str:
    """What a boxed tyro error says is wrong, in one line: the unrecognized or missing options, else the
    first paragraph (a bad value or choice)."""
    blocks, cur = [], []
    for raw in message.splitlines():
        inner = raw.strip().strip("│").strip()
        if raw.strip().startswith(("╭", "╰")) or set(inner) <= set("─ "):   # box edges and separators
            blocks, cur = blocks + [cur] if cur else blocks, []
            continue
        cur.append(inner)
    blocks += [cur] if cur else []
    for title, say in (("Unrecognized", "unrecognized option"), ("Missing", "missing required option")):
        opts = [line.split()[0] for b in blocks if b[0].startswith(title) for line in b[1:] if line.startswith("-")]
        if opts:
            return f"{say} {', '.join(opts)}"
    return " ".join(blocks[0]) if blocks else "could not parse the command line"


def run(main, prog: str, errors: tuple[type[BaseException], ...], argv: list[str]):
    """main(argv); an input error prints `prog: message (see prog --help)` and exits with status 2."""
    try:
        return main(argv)
    except (UsageError,) + errors as e:
        print(f"{prog}: {e}" + (f" (see {prog} --help)" if isinstance(e, UsageError) else ""), file=sys.stderr)
        raise SystemExit(2) from None
