"""The ZeroTIR tool protocol, in one place: detect a closed ```python block in what a sequence just wrote,
run its code on a thread pool while the other sequences keep decoding, and splice the result back as an
```output block whose tokens are prefilled into the same cache row (the engine resumes from there: nothing
before it is recomputed). Tool tokens carry policy_mask 0 and log-prob 0.

The block's layout and the overflow rule are the paper's (math_tir_process_single_request.py):
"\\n```output\\n" + result + "\\n```\\n\\n\\n", and a block over the token limit replaced by a fixed message.
"""
from __future__ import annotations

import re
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

CODE_BLOCK = re.compile(r"```python[^\n]*\n(.*?)```", re.DOTALL)
OUTPUT_TAIL = "\n```\n\n\n"   # the paper's output-block ending
TOO_LONG = "The output of the code execution is too long, please check your code."   # the paper's message


@dataclass
class ToolOutput:
    text: str
    error: bool = False    # the code failed (its error is what the model sees)
    failed: bool = False   # the tool itself failed (a sandbox that could not run the code, a tool that raised)


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
    return ToolOutput(r.text, bool(getattr(r, "error", False)) or failed, failed)


class ToolProtocol:
    def __init__(self, tok, tool, cfg):
        self.tok, self.cfg = tok, cfg
        self.run = tool.run if hasattr(tool, "run") else tool
        self.pool = ThreadPoolExecutor(cfg.tool_workers)

    def watch(self, s, tail: str) -> bool:
        """After a sampled token: if the text since the last tool output closes a ```python block, submit its
        code and park the sequence. tail: the decoded end of the sequence (the engine decodes it anyway)."""
        if s.tool_calls >= self.cfg.max_tool_calls or "```" not in tail:
            return False
        blocks = list(CODE_BLOCK.finditer(self.tok.decode(s.tokens[s.segment_start:])))
        if not blocks:
            return False
        s.tool_calls += 1
        s.future = self.pool.submit(self.run, blocks[-1].group(1))
        s.segment_start = len(s.tokens)   # this block is handled; the next segment starts after it
        return True

    def finished(self, parked: list, block: bool) -> list:
        """-> [(sequence, ToolOutput)] for the parked sequences whose code has run; with block, waits for at
        least one (when nothing else could make progress). A tool that raised is a failed tool call."""
        if block and parked:
            wait([s.future for s in parked], return_when=FIRST_COMPLETED)
        done = []
        for s in parked:
            if s.future.done():
                try:
                    out = to_tool_output(s.future.result())
                except Exception as e:  # a broken tool must not take the batch down
                    out = ToolOutput(f"tool failed: {type(e).__name__}: {e}", error=True, failed=True)
                s.future = None
                done.append((s, out))
        return done

    def output_tokens(self, s, out: ToolOutput, room: int) -> list[int]:
        """The output block's tokens (the leading newline only when the model's text does not end with one).
        A block over max_tool_output_tokens is replaced by the paper's message (tool_output_overflow="replace")
        or cut ("truncate"); then the block is cut to the `room` left in the response."""
        c = self.cfg
        enc = lambda x: self.tok.encode(x, add_special_tokens=False)
        head = ("" if self.tok.decode(s.tokens[-1:]).endswith("\n") else "\n") + "```output\n"
        toks = enc(head + out.text.rstrip("\n") + OUTPUT_TAIL)
        if len(toks) > c.max_tool_output_tokens:
            if c.tool_output_overflow == "replace":
                toks = enc(head + TOO_LONG + OUTPUT_TAIL)
            else:
                note, tail = enc("\n... (output truncated)"), enc(OUTPUT_TAIL)
                toks = toks[:max(c.max_tool_output_tokens - len(note) - len(tail), 0)] + note + tail
        return toks[:max(room, 0)]

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
