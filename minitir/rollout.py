"""Rollouts, shared by training (trainer.py) and evaluation (eval.py): the tool the model's code runs in,
the generation settings, groups of responses to problems, grading them, and the metrics the paper reports
(code ratio, response length, accuracy)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import torch

from minitir.generate import Engine, GenerationConfig
from minitir.reward import RewardConfig, judge, outcome_reward
from minitir.sample import Sample
from minitir.tasks import DatasetError, Problem, PromptTemplate, render_prompt


class TimedTool:
    """The tool (a sandbox, an object with .run, or a callable), adding up the time its code ran: the run's own
    time as the sandbox reports it (ExecResult.duration_s, the wait for a free worker left out), else (a plain
    callable, or a sandbox that failed to run it) the call's.
    Runs overlap decoding and one another: a sum of work, not a share of the step's wall time."""

    def __init__(self, tool):
        self.tool, self.seconds, self._lock = tool, 0.0, threading.Lock()
        if hasattr(tool, "submit"):   # a sandbox's own queue, as the tool protocol uses it (else: its threads)
            self.submit = self._submit

    def run(self, code):
        t = time.perf_counter()
        r = self.tool.run(code) if hasattr(self.tool, "run") else self.tool(code)
        self._add(r, t)
        return r

    def _submit(self, code) -> Future:
        t = time.perf_counter()
        future = self.tool.submit(code)
        # counted as the run ends, on the sandbox's thread (just after the engine may take the result back)
        future.add_done_callback(lambda f: f.cancelled() or self._add(f.result() if f.exception() is None else None, t))
        return future

    def _add(self, r, t: float):
        spent = None if getattr(r, "failed", False) else getattr(r, "duration_s", None)   # a failure: the wait
        with self._lock:   # runs end on other threads
            self.seconds += time.perf_counter() - t if spent is None else spent

    def close(self):
        if hasattr(self.tool, "close"):
            self.tool.close()


def make_tool(url: str, timeout_s: float, memory_mb: int, workers: int, allow_unisolated: bool = False) -> TimedTool:
    """The sandbox: a remote `sandbox.py serve` / SandboxFusion server at url, else local fork servers, which
    raise SandboxUnavailable where nothing isolates them (unless allow_unisolated)."""
    from minitir.sandbox import RemoteSandbox, Sandbox
    if url:
        return TimedTool(RemoteSandbox(url, timeout_s=timeout_s, memory_mb=memory_mb))
    return TimedTool(Sandbox(timeout_s, memory_mb, workers=workers, allow_unisolated=allow_unisolated))


def generation_config(template: PromptTemplate, *, max_tool_calls: int, **kw) -> GenerationConfig:
    """The template's stop strings, and tool calls only where the template executes code."""
    return GenerationConfig(stop=template.stop, max_tool_calls=max_tool_calls if template.tools else 0, **kw)


def prompt_ids(tok, template: PromptTemplate, question: str) -> list[int]:
    return tok(render_prompt(template, question, tok)).input_ids


def within_prompt_budget(problems: list[Problem], tok, template: PromptTemplate, max_prompt_tokens: int,
                         say=print) -> tuple[list[Problem], int]:
    """-> (the problems whose prompt fits max_prompt_tokens, how many did not). A longer prompt is skipped
    before any generation, and said, rather than let eat into the response budget (the paper's code cuts it
    to the budget instead, losing the question's end)."""
    fits = [p for p in problems if len(prompt_ids(tok, template, p.question)) <= max_prompt_tokens]
    skipped = len(problems) - len(fits)
    if not fits:
        raise DatasetError(f"no training problem's prompt fits --max-prompt-tokens {max_prompt_tokens}; raise it")
    if skipped:
        say(f"skipped {skipped} of {len(problems)} training problems: their prompt is longer than "
            f"--max-prompt-tokens {max_prompt_tokens}")
    return fits, skipped


def generate_groups(engine: Engine, template: PromptTemplate, problems: list[Problem], n: int, gen: GenerationConfig,
                    autocast: bool = False, progress=None) -> list[Sample]:
    """n responses to each problem, as samples in problem order, from the engine's model, tokenizer and tool.
    gen.seed_offset is the index of problems[0] times n in the whole batch: sampling streams are per response,
    so a response does not depend on how many processes share the batch. progress: see Engine.generate."""
    prompts = [prompt_ids(engine.tok, template, p.question) for p in problems]
    engine.model.eval()
    # a CPU decodes a bfloat16 copy as it is: under autocast its products would leave oneDNN's packed weights
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                        enabled=autocast and engine.model.device.type == "cuda"):
        outs = engine.generate([ids for ids in prompts for _ in range(n)], gen, progress)
    return [Sample(prompt_ids=prompts[i // n], completion=c, gold=problems[i // n].answer,
                   question=problems[i // n].question) for i, c in enumerate(outs)]


def grade(samples: list[Sample], grader, reward: RewardConfig, tok=None):
    """Sets answer, format_ok, graded, correct and reward on each sample through the one reward path
    (reward.judge, reward.outcome_reward), on the model's own text: the policy's tokens, the tool's left
    out by their mask. A check the grader could not make, or a tool call the sandbox failed (the outcome is
    then not the policy's alone), leaves the sample ungraded and incorrect."""
    count = (lambda text: len(tok.encode(text, add_special_tokens=False))) if hasattr(tok, "encode") else None
    found = judge([(s.completion.policy_text or s.completion.text, s.completion.finish_reason == "stop")
                   for s in samples], [s.gold for s in samples], reward.kind, grader, count)
    for s, j in zip(samples, found):
        c, failed = s.completion, s.completion.num_tool_failures > 0
        s.answer, s.format_ok = j.answer, j.format_ok
        s.graded, s.correct = j.graded and not failed, j.correct and not failed
        s.reward = outcome_reward(s.correct, s.format_ok, c.finish_reason == "length", reward)


def sample_row(s: Sample) -> dict:
    """What the rollout metrics need about one sample (small: gathered from every rank)."""
    c = s.completion
    return {"reward": s.reward, "correct": s.correct, "graded": s.graded, "format_ok": s.format_ok,
            "calls": c.num_tool_calls, "errors": c.num_tool_errors, "tool_failed": c.num_tool_failures > 0,
            "timeouts": c.num_tool_timeouts,
            "policy_len": sum(c.policy_mask),
            "len": len(c.tokens), "truncated": c.finish_reason == "length"}


def rollout_metrics(rows: list[dict]) -> dict:
    """The quantities whose growth with training the paper reports. Accuracy is over the graded responses;
    the others are counted: tool_failures (the sandbox failed under a code block), tool_timeouts (code that
    ran into its time limit) and grade_errors (the grader could not check the answer)."""
    n = max(len(rows), 1)
    graded = [r for r in rows if r["graded"]]
    calls = sum(r["calls"] for r in rows)
    return {
        "reward": sum(r["reward"] for r in graded) / max(len(graded), 1),
        "accuracy": sum(r["correct"] for r in graded) / max(len(graded), 1),
        "tool_failures": sum(r["tool_failed"] for r in rows),
        "tool_timeouts": sum(r["timeouts"] for r in rows),   # wall-clock limits: where a rerun may differ
        "grade_errors": sum(not r["graded"] and not r["tool_failed"] for r in rows),
        "code_ratio": sum(r["calls"] > 0 for r in rows) / n,
        "tool_calls_per_response": calls / n,
        "tool_error_rate": sum(r["errors"] for r in rows) / max(calls, 1),
        "response_length": sum(r["policy_len"] for r in rows) / n,    # policy tokens only
        "response_length_all": sum(r["len"] for r in rows) / n,
        "truncation_rate": sum(r["truncated"] for r in rows) / n,
        "format_failure_rate": sum(not r["format_ok"] for r in rows) / n,
    }
