"""What one rollout leaves behind and carries through the step: the generator's Completion (tokens, log-probs,
policy mask, tool counts) and the Sample built around it (grade, advantages, log-probs, loss mask). Below the
generator, batching, the learner and the trainer, all of which pass them on; it imports nothing of minitir."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    tokens: list[int]          # everything after the prompt: sampled tokens and tool-output tokens
    logprobs: list[float]      # log p(token) under the distribution sampled from (sampling.sample); 0 for tool tokens
    policy_mask: list[int]     # 1 = sampled by the policy, 0 = inserted by the tool
    text: str
    finish_reason: str         # "stop" (EOS or stop string), "length", "prompt_too_long"
    num_tool_calls: int = 0
    num_tool_errors: int = 0
    num_tool_failures: int = 0  # calls the tool itself failed (ToolOutput.failed): not the policy's outcome alone
    num_tool_timeouts: int = 0  # calls that ran into their wall-clock limit (ToolOutput.timeout)
    policy_text: str = ""      # the model's own text: the policy tokens alone, tool output left out


@dataclass
class Sample:
    """One response and everything the update needs about it. Each field is set once, by the step named
    (a custom reward_fn of the trainer replaces `reward` right after grading)."""
    prompt_ids: list[int]
    completion: Completion
    gold: str
    question: str = ""
    # grade (the one reward path): what was compared, the verdict, the reward
    correct: bool = False
    graded: bool = True            # False: the grader could not check it, or the sandbox failed under its code
                                   # (counted apart, kept out of the statistics and the loss)
    format_ok: bool = False
    answer: str | None = None      # what was compared with the gold answer
    reward: float = 0.0
    # keep (trainer): the group estimator's outcome advantage, computed over the whole group before filters,
    # and the tokens the loss trains on
    outcome_adv: float = 0.0
    loss_mask: list[int] = field(default_factory=list)  # over completion tokens: 1 = a policy token in the loss
    # behaviour log-probs (Learner.behaviour_logprobs), per loss token: the trainer's log-probs under the weights that
    # generated the sample. Empty when the sample is trained in one update by those same weights: the
    # update's own log-probs, detached, are then the same numbers (ratio 1) without a forward pass.
    old_logp: list[float] = field(default_factory=list)
    carried: bool = False          # made in an earlier step (carry_over): trained off-policy against old_logp
    # prepare (trainer), per loss token
    ref_logp: list[float] = field(default_factory=list)
    old_values: list[float] = field(default_factory=list)
    adv: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
