"""Rollouts, shared by training (trainer.py) and evaluation (eval.py): the tool the model's code runs in,
the generation settings, groups of responses to problems, grading them, and the metrics the paper reports
(code ratio, response length, accuracy)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from minitir.generate import Completion, Engine, GenerationConfig
from minitir.reward import answer_to_grade
from minitir.tasks import Problem, PromptTemplate, render_prompt


@dataclass
class Sample:
    """One response and everything the update needs about it."""
    prompt_ids: list[int]
    completion: Completion
    gold: str
    question: str = ""
    correct: bool = False
    graded: bool = True            # False: the grader could not check it, or the sandbox failed under its code
                                   # (counted apart, kept out of the statistics and the loss)
    format_ok: bool = False
    answer: str | None = None      # what was compared with the gold answer
    reward: float = 0.0
    score: float = 0.0             # outcome advantage from the group baseline, before the token broadcast
    loss_mask: list[int] = field(default_factory=list)  # over completion tokens
    adv: list[float] = field(default_factory=list)      # per policy token (compacted)
    old_logp: list[float] = field(default_factory=list)
    ref_logp: list[float] = field(default_factory=list)
    old_values: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)


class TimedTool:
    """Wraps the sandbox to add up the time spent executing code (it overlaps with decoding)."""

    def __init__(self, tool):
        self.tool, self.seconds = tool, 0.0

    def run(self, code):
        t = time.perf_counter()
        try:
            return self.tool.run(code)
        finally:
            self.seconds += time.perf_counter() - t

    def close(self):
        if hasattr(self.tool, "close"):
            self.tool.close()


def make_tool(url: str, timeout_s: float, memory_mb: int, workers: int) -> TimedTool:
    """The sandbox: a remote `sandbox.py serve` / SandboxFusion server at url, else local fork servers."""
    from minitir.sandbox import RemoteSandbox, Sandbox
    return TimedTool(RemoteSandbox(url, timeout_s=timeout_s) if url else Sandbox(timeout_s, memory_mb, workers=workers))


def generation_config(template: PromptTemplate, *, max_tool_calls: int, **kw) -> GenerationConfig:
    """The template's stop strings, and tool calls only where the template executes code."""
    return GenerationConfig(stop=template.stop, max_tool_calls=max_tool_calls if template.tools else 0, **kw)


def generate_groups(model, tok, template: PromptTemplate, problems: list[Problem], n: int, gen: GenerationConfig,
                    tool=None, autocast: bool = False) -> list[Sample]:
    """n responses to each problem, as samples in problem order. gen.seed_offset is the index of problems[0]
    times n in the whole batch: sampling streams are per response, so a response does not depend on how many
    processes share the batch."""
    prompts = [tok(render_prompt(template, p.question, tok)).input_ids for p in problems]
    model.eval()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
        outs = Engine(model, tok, gen, tool).generate([ids for ids in prompts for _ in range(n)])
    return [Sample(prompt_ids=prompts[i // n], completion=c, gold=problems[i // n].answer,
                   question=problems[i // n].question) for i, c in enumerate(outs)]


def grade(samples: list[Sample], grader, kind: str, tok=None):
    """Sets answer, correct, format_ok and graded on each sample. strict: the paper's gates (format and
    ended normally), then the final answer after </think>; lenient: any \\boxed answer. Tool output never
    counts (the model's own text is graded). A check the grader could not make, or a tool call the sandbox
    failed (the outcome is then not the policy's alone), leaves the sample ungraded."""
    count = (lambda text: len(tok.encode(text, add_special_tokens=False))) if hasattr(tok, "encode") else None
    for s in samples:
        c = s.completion
        s.answer, s.format_ok = answer_to_grade(c.policy_text or c.text, c.finish_reason == "stop", kind, count)
    verdicts = grader.math_equal_many([(s.answer, s.gold) for s in samples])
    for s, ok in zip(samples, verdicts):
        failed = s.completion.num_tool_failures > 0
        s.graded, s.correct = ok is not None and not failed, bool(ok) and not failed


def sample_row(s: Sample) -> dict:
    """What the rollout metrics need about one sample (small: gathered from every rank)."""
    c = s.completion
    return {"reward": s.reward, "correct": s.correct, "graded": s.graded, "format_ok": s.format_ok,
            "calls": c.num_tool_calls, "errors": c.num_tool_errors, "tool_failed": c.num_tool_failures > 0,
            "policy_len": sum(c.policy_mask),
            "len": len(c.tokens), "truncated": c.finish_reason == "length"}


def rollout_metrics(rows: list[dict]) -> dict:
    """The quantities whose growth with training the paper reports. Accuracy is over the graded responses;
    the others are counted: tool_failures (the sandbox failed under a code block) and grade_errors (the
    grader could not check the answer)."""
    n = max(len(rows), 1)
    graded = [r for r in rows if r["graded"]]
    calls = sum(r["calls"] for r in rows)
    return {
        "reward": sum(r["reward"] for r in graded) / max(len(graded), 1),
        "accuracy": sum(r["correct"] for r in graded) / max(len(graded), 1),
        "tool_failures": sum(r["tool_failed"] for r in rows),
        "grade_errors": sum(not r["graded"] and not r["tool_failed"] for r in rows),
        "code_ratio": sum(r["calls"] > 0 for r in rows) / n,
        "tool_calls_per_response": calls / n,
        "tool_error_rate": sum(r["errors"] for r in rows) / max(calls, 1),
        "response_length": sum(r["policy_len"] for r in rows) / n,    # policy tokens only
        "response_length_all": sum(r["len"] for r in rows) / n,
        "truncation_rate": sum(r["truncated"] for r in rows) / n,
        "format_failure_rate": sum(not r["format_ok"] for r in rows) / n,
    }
