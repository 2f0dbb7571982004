"""The RL math, every detail in one place: advantage estimators, the clipped policy loss, the whole
per-token objective (`token_objective`), loss aggregation, KL estimators, the value loss and GAE.

Shapes: G prompt groups of n responses each; token-level tensors are flat over a (micro-)batch of
packed sequences, [N], and always travel with their mask [N] (1 = a token the policy sampled; prompt,
tool-output and masked-out tokens are 0).
"""
from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


# --- outcome advantages: one scalar per response ------------------------------------------------
def group_advantages(rewards: torch.Tensor, kind: str, valid: torch.Tensor | None = None,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards [G, n] -> advantages [G, n] (one value per response, broadcast to its tokens later).

    grpo:         (r - mean_group) / (std_group + eps)          (GRPO, DeepSeekMath)
    dr_grpo:      r - mean_group                                 (Dr. GRPO: no std scaling)
    rloo:         r - mean of the other responses                (leave-one-out baseline)
    reinforce_pp: r - mean_group, whitened later over the batch's tokens (see `whiten`)
                  (REINFORCE++ with a group baseline: the paper's `reinforce_baseline`)
    valid [G, n] (bool): responses that count (those the grader could check); the statistics use only
    them and the others get 0.
    """
    v = torch.ones_like(rewards) if valid is None else valid.to(rewards.dtype)
    cnt = v.sum(dim=1, keepdim=True)                                           # [G, 1]
    mean = (rewards * v).sum(dim=1, keepdim=True) / cnt.clamp(min=1)           # [G, 1]
    centred = (rewards - mean) * v
    if kind == "grpo":  # unbiased std, as in verl; a group of one has none
        std = ((centred ** 2).sum(dim=1, keepdim=True) / (cnt - 1).clamp(min=1)).sqrt() * (cnt > 1)
        return centred / (std + eps)
    if kind in ("dr_grpo", "reinforce_pp"):
        return centred
    if kind == "rloo":
        if rewards.shape[1] < 2:
            raise ValueError("rloo needs at least 2 responses per prompt")
        return centred * cnt / (cnt - 1).clamp(min=1)                          # = r - (sum - r) / (cnt - 1)
    raise ValueError(f"unknown advantage estimator {kind!r}; choose from {ADVANTAGES}")


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, all_reduce=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0. values, mask [N].

    all_reduce: sums a tensor across data-parallel ranks in place, so mean and std are the global batch's."""
    reduce = all_reduce or (lambda t: t)
    m = mask.to(values.dtype)
    count_sum = reduce(torch.stack([m.sum(), (values * m).sum()]))                    # [2]
    count = count_sum[0].clamp(min=1)
    mean = count_sum[1] / count
    var = reduce((((values - mean) * m) ** 2).sum()) / count
    return (values - mean) * torch.rsqrt(var + eps) * m


def kl_reward_to_go(penalty: torch.Tensor) -> torch.Tensor:
    """KL in the reward, per token, for the outcome estimators. penalty [L]: kl_coef * KL_t at one response's
    policy tokens, in order -> [L]: sum over t' >= t of penalty_t', to subtract from the outcome advantage.

    As REINFORCE++ defines it (OpenRLHF's compute_reward and get_cumulative_returns, gamma 1, which the
    paper's code applies to every outcome estimator): each token's reward is -kl_coef * KL_t, the outcome
    reward comes at the last token, and the advantage at t is the return from t on, so a token is charged
    for the divergence of itself and what follows it, not of what came before. Tool tokens are not the
    policy's: they have no KL and are not in [L]."""
    return penalty.flip(0).cumsum(0).flip(0)


# --- GAE for PPO with a critic ------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the policy tokens of each sequence.

    rewards, values, mask: [B, T] (padded). Tokens with mask 0 (tool output, padding) are not steps of
    the trajectory: the recursion passes over them, so a tool call does not break the credit chain.
    -> (advantages [B, T], returns [B, T]), zero where mask is 0.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)   # V(s_{t+1}), 0 after the end
    next_adv = torch.zeros_like(next_value)
    for t in range(T - 1, -1, -1):
        m = mask[:, t].bool()
        delta = rewards[:, t] + gamma * next_value - values[:, t]              # [B]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a, torch.zeros_like(a))
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, a, next_adv)
    returns = (adv + values) * mask
    return adv, returns


# --- losses, per token --------------------------------------------------------------------------
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float,
                clip_high: float, dual_clip: float | None = None):
    """PPO's clipped surrogate, with separate lower/upper ranges (clip-higher) and optional dual clip.

    logp, old_logp, adv: [N] -> (loss [N], clipped [N] bool: where the clip was active).
    """
    ratio = torch.exp(logp - old_logp)                                          # [N]
    surr = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    objective = torch.minimum(surr, surr_clipped)
    clipped = surr_clipped < surr
    if dual_clip is not None:  # for negative advantages, bound the loss by dual_clip * |adv| (Ye et al. 2020)
        lower = dual_clip * adv
        dual = (adv < 0) & (objective < lower)
        objective = torch.where(adv < 0, torch.maximum(objective, lower), objective)
        clipped = clipped | dual
    return -objective, clipped


def tis_weights(old_logp: torch.Tensor, gen_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): the generator samples from a slightly different distribution than the
    trainer computes (other kernels, bfloat16), so each token's loss is weighted by
    min(pi_old / pi_generator, cap), as a constant. old_logp, gen_logp [N] -> weights [N]."""
    return torch.exp(old_logp - gen_logp).clamp(max=cap).detach()


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi. [N] -> [N].

    k1: log r;  k2: (log r)^2 / 2;  k3: (r^-1 - 1) + log r, with log r = logp - ref_logp (Schulman 2020).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose from k1, k2, k3")


@dataclass
class ObjectiveStats:
    """Weighted token sums of what the objective computed (weights of a mini-batch sum to 1 over all ranks,
    so once summed over micro-batches and ranks these are the mini-batch's means)."""
    loss: float = 0.0
    clipfrac: float = 0.0       # share of tokens where the clip was active
    entropy: float = 0.0
    kl: float = 0.0             # estimated KL(policy || reference), when there is a reference
    approx_kl: float = 0.0      # CleanRL's approx_kl: (r - 1) - log r between the policy now and the behaviour
                                # policy (0 in the first update of a step for samples made in that step)
    tis_capped: float = 0.0     # share of tokens whose truncated importance weight hit the cap (tis_cap > 0)

    def __add__(self, other: "ObjectiveStats") -> "ObjectiveStats":
        return ObjectiveStats(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def all_reduce(self, all_reduce) -> "ObjectiveStats":
        return ObjectiveStats(*all_reduce(torch.tensor(astuple(self), dtype=torch.float64)).tolist())


def token_objective(logp: torch.Tensor, entropy: torch.Tensor | None, old_logp: torch.Tensor | None,
                    adv: torch.Tensor, weights: torch.Tensor, *, clip_low: float, clip_high: float,
                    dual_clip: float | None = None, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                    kl_estimator: str = "k3", entropy_coef: float = 0.0, gen_logp: torch.Tensor | None = None,
                    tis_cap: float = 0.0) -> tuple[torch.Tensor, ObjectiveStats]:
    """The policy's objective over C tokens -> (loss = sum_t w_t * l_t, statistics).

    l_t = -min(r_t A_t, clip(r_t) A_t) * tis_t + kl_coef * KL_t - entropy_coef * H_t, r_t = exp(logp - old_logp).
    The ratio's two log-probs are the trainer's, of the full (untruncated) policy at the sampling temperature:
    logp under the weights being updated, old_logp under the weights that generated the token (the behaviour
    policy; None: those are the weights being updated, r = 1 with r's gradient). tis_t = min(pi_old /
    pi_generator, tis_cap) when tis_cap > 0, else 1, where pi_generator is the distribution the generator
    actually drew the token from (its own kernels and precision, top-k / top-p applied): what the trainer's
    pi_old cannot see. logp, entropy, old_logp, adv, weights, ref_logp, gen_logp: [C]. KL and H enter only
    with their coefficients, and are reported whenever given."""
    old = logp.detach() if old_logp is None else old_logp
    tok, clipped = policy_loss(logp, old, adv, clip_low, clip_high, dual_clip)               # [C]
    capped = torch.zeros_like(tok, dtype=torch.bool)
    if tis_cap:
        is_w = tis_weights(old.float(), gen_logp, tis_cap)                                     # [C]
        tok, capped = tok * is_w, is_w >= tis_cap
    kl = kl_estimate(logp, ref_logp, kl_estimator) if ref_logp is not None else None        # [C]
    if kl is not None and kl_coef:
        tok = tok + kl_coef * kl
    if entropy is not None and entropy_coef:
        tok = tok - entropy_coef * entropy
    loss = (tok * weights).sum()
    with torch.no_grad():
        w = weights.float()
        log_ratio = logp.detach().float() - old.float()
        stats = ObjectiveStats(
            loss=float(loss), clipfrac=float((clipped.float() * w).sum()),
            entropy=float((entropy.detach().float() * w).sum()) if entropy is not None else 0.0,
            kl=float((kl.detach().float() * w).sum()) if kl is not None else 0.0,
            approx_kl=float(((log_ratio.exp() - 1 - log_ratio) * w).sum()),
            tis_capped=float((capped.float() * w).sum()))
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None):
    """0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2) per token, [N]."""
    loss = (values - returns) ** 2
    if clip is not None:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (v_clipped - returns) ** 2)
    return 0.5 * loss


# --- aggregation: per-token weights computed once per mini-batch, so micro-batches simply add up ---
def token_weights(mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, kind: str,
                  max_len: int | None = None, total_tokens: float | None = None) -> torch.Tensor:
    """Weights w [N] such that loss = sum(w * loss_token) over the mini-batch.

    mask [N]; seq_index [N] (which sequence each token belongs to, 0..S-1 for this process's S sequences).
    With data parallelism, num_seqs and total_tokens (default: mask.sum()) are the global mini-batch's, so
    the weights of all ranks together sum to 1.
    token_mean:              every policy token of the mini-batch counts the same
    seq_mean_token_mean:     mean over sequences of each sequence's token mean
    seq_mean_token_sum_norm: token sums divided by a constant, num_seqs * max_len (Dr. GRPO), so longer
                             responses are not down-weighted per token
    """
    m = mask.to(torch.float32)
    if kind == "token_mean":
        return m / (m.sum() if total_tokens is None else torch.tensor(total_tokens)).clamp(min=1)
    if kind == "seq_mean_token_mean":
        S = int(seq_index.max()) + 1 if len(seq_index) else 0
        per_seq = torch.zeros(S, device=m.device).index_add_(0, seq_index, m)          # [S] tokens per sequence
        return m / (per_seq[seq_index].clamp(min=1) * num_seqs)
    if kind == "seq_mean_token_sum_norm":
        if not max_len:
            raise ValueError("seq_mean_token_sum_norm needs max_len (the response length budget)")
        return m / (num_seqs * max_len)
    raise ValueError(f"unknown loss aggregation {kind!r}; choose from {AGGREGATIONS}")
