"""The result of one run, and the text the model sees of it."""
from __future__ import annotations

import re
from dataclasses import dataclass

# sandbox_error: the sandbox could not run the code (a worker that died or would not start, a server out of
# reach); not the code's doing, so a response whose code met it says nothing about the policy
STATUSES = ("ok", "error", "timeout", "memory", "disk", "killed", "sandbox_error")


@dataclass
class ExecResult:
    status: str                # ok | error | timeout | memory | disk | killed | sandbox_error
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    duration_s: float = 0.0

    @property
    def error(self) -> bool:
        return self.status != "ok"

    @property
    def failed(self) -> bool:
        """The sandbox failed, not the code."""
        return self.status == "sandbox_error"

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
                  "disk": "OSError: the code's files passed its disk budget",
                  "killed": f"the code was killed (exit status {self.exit_code})",
                  "sandbox_error": "the sandbox failed to run the code"}.get(self.status, "")
        return "\n".join(p for p in (err, reason) if p)
