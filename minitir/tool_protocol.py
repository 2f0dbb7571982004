"""The ZeroTIR tool protocol, in one place: find a closed ```python block in what a sequence just wrote,
run its code while the other sequences keep decoding, and turn the result into an
```output block's tokens, which the engine prefills into the same cache row (it resumes from there: nothing
before it is recomputed). Tool tokens carry policy_mask 0 and log-prob 0. The protocol returns code, futures
and tokens; the engine alone changes its sequences, and takes a result back at a step fixed by when the block
closed (generate.py), so which rows decode together never depends on how fast the code ran.

The block's layout and the overflow rule are the paper's (math_tir_process_single_request.py):
"\\n```output\\n" + result + "\\n```\\n\\n\\n", and a block over the token limit replaced by a fixed message.
"""
from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

CODE_BLOCK = re.compile(r"```python[^\n]*\n(.*?)```", re.DOTALL)
OUTPUT_TAIL = "\n```\n\n\n"   # the paper's output-block ending
TOO_LONG = "The output of the code execution is too long, please check your code."   # the paper's message


@dataclass
class ToolOutput:
    text: str
    error: bool = False    # the code failed (its error is what the model sees)
    failed: bool = False   # the tool itself failed (a sandbox that could not run the code, a tool that raised)
    timeout: bool = False  # the code ran into its wall-clock limit: where a rerun may see another result


def to_tool_output(r) -> ToolOutput:
    """A tool may return a ToolOutput, an object with .text (and .error, .failed: an ExecResult), a
    (text, error) tuple or a string."""
    if isinstance(r, ToolOutput):
        return r
    if isinstance(r, tuple):
        return ToolOutput(str(r[0]), bool(r[1]))
    if isinstance(r, str):
        return ToolOutput(r)
    failed = bool(getattr(r, "failed", False))
    return ToolOutput(r.text, bool(getattr(r, "error", False)) or failed, failed, getattr(r, "status", "") == "timeout")


class ToolProtocol:
    def __init__(self, tok, tool, cfg):
        self.tok, self.cfg = tok, cfg
        # a sandbox queues the runs for its workers itself (its submit -> Future); a plain function, or an
        # object with .run only, runs on threads of our own
        self.pool = None if hasattr(tool, "submit") else ThreadPoolExecutor(cfg.tool_workers)
        self._submit = tool.submit if self.pool is None else partial(self.pool.submit, getattr(tool, "run", tool))
        self.pending: set[Future] = set()   # submitted, not taken back yet

    def code(self, segment: list[int], tail: str) -> str | None:
        """The code of the last ```python block closed in `segment` (the tokens since the last output block),
        or None. tail: the decoded end of the sequence (the engine decodes it anyway), a cheap first check."""
        if "```" not in tail:
            return None
        blocks = CODE_BLOCK.findall(self.tok.decode(segment))
        return blocks[-1] if blocks else None

    def submit(self, code: str) -> Future:
        try:
            future = self._submit(code)
        except Exception as e:   # a tool that cannot take the run (e.g. closed): its failure, in the future
            future = Future()
            future.set_exception(e)
        self.pending.add(future)
        return future

    def result(self, future: Future) -> ToolOutput:
        """The run's output, waiting for it if need be; a tool that raised is a failed tool call."""
        try:
            out = to_tool_output(future.result())
        except Exception as e:  # a broken tool must not take the batch down
            out = ToolOutput(f"tool failed: {type(e).__name__}: {e}", error=True, failed=True)
        self.pending.discard(future)   # after the wait: an interrupted wait leaves it for close() to cancel
        return out

    def output_tokens(self, last: list[int], out: ToolOutput, room: int) -> list[int]:
        """The output block's tokens (the leading newline only when the model's last token `last` does not end
        with one). A block over max_tool_output_tokens is replaced by the paper's message
        (tool_output_overflow="replace") or cut ("truncate"); then the block is cut to the `room` left in the
        response."""
        c = self.cfg
        enc = lambda x: self.tok.encode(x, add_special_tokens=False)
        head = ("" if self.tok.decode(last).endswith("\n") else "\n") + "```output\n"
        toks = enc(head + out.text.rstrip("\n") + OUTPUT_TAIL)
        if len(toks) > c.max_tool_output_tokens:
            if c.tool_output_overflow == "replace":
                toks = enc(head + TOO_LONG + OUTPUT_TAIL)
            else:
                note, tail = enc("\n... (output truncated)"), enc(OUTPUT_TAIL)
                toks = toks[:max(c.max_tool_output_tokens - len(note) - len(tail), 0)] + note + tail
        return toks[:max(room, 0)]

    def close(self):
        """Runs not started yet are cancelled (a generation that ended early, e.g. on an exception)."""
        for future in self.pending:   # every run went through submit: the pool's queued ones too
            future.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=False)
