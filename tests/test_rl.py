"""The RL math against hand-computed values."""
import math

import pytest
import torch

from minitir import rl

pytestmark = pytest.mark.quick   # the inner loop: pytest -m quick


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: all equal -> zero advantage
    s = math.sqrt(1 / 3)
    grpo = rl.group_advantages(r, "grpo")
    assert torch.allclose(grpo[0], torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]), atol=1e-5)
    assert torch.equal(grpo[1], torch.zeros(4))
    assert torch.allclose(rl.group_advantages(r, "dr_grpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # rloo: r_i - mean of the other three: 1 - 1/3, 0 - 2/3, ...
    assert torch.allclose(rl.group_advantages(r, "rloo")[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert torch.equal(rl.group_advantages(r, "rloo")[1], torch.zeros(4))


def test_group_advantages_leave_out_ungraded_responses():
    r = torch.tensor([[1.0, 0.0, 5.0, 1.0]])
    valid = torch.tensor([[True, True, False, True]])   # the third could not be graded
    # over the other three: mean 2/3, unbiased std sqrt(1/3); the third gets 0
    s = math.sqrt(1 / 3)
    assert torch.allclose(rl.group_advantages(r, "grpo", valid)[0], torch.tensor([(1 / 3) / s, -(2 / 3) / s, 0, (1 / 3) / s]),
                          atol=1e-5)
    assert torch.allclose(rl.group_advantages(r, "rloo", valid)[0], torch.tensor([0.5, -1.0, 0.0, 0.5]))
    assert torch.allclose(rl.group_advantages(r, "dr_grpo", valid)[0], torch.tensor([1 / 3, -2 / 3, 0, 1 / 3]))


def test_tis_weights_by_hand():
    w = rl.tis_weights(torch.tensor([-1.0, -1.0, -3.0]), torch.tensor([-1.0, -2.0, -1.0]), cap=2.0)
    assert torch.allclose(w, torch.tensor([1.0, 2.0, math.exp(-2.0)]))   # e^1 capped at 2


def test_whiten_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    w = rl.whiten(x, m)
    # mean 2, population var 2/3
    assert torch.allclose(w, torch.tensor([-1 / math.sqrt(2 / 3), 0.0, 1 / math.sqrt(2 / 3), 0.0]), atol=1e-4)


def test_policy_loss_clip_higher_and_dual_clip_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 4.0]))   # ratios
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = rl.policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # ratio 1.5, A=+1: clipped to 1.28 -> -1.28 | ratio 0.5, A=-1: clipped to 0.8 -> +0.8
    # ratio 1.1, A=+1: inside -> -1.1          | ratio 4.0, A=-1: min(-4, -1.28) = -4 -> +4
    assert torch.allclose(loss, torch.tensor([-1.28, 0.8, -1.1, 4.0]), atol=1e-6)
    assert clipped.tolist() == [True, True, False, False]
    loss, clipped = rl.policy_loss(logp, old, adv, 0.2, 0.28, dual_clip=3.0)
    assert torch.allclose(loss, torch.tensor([-1.28, 0.8, -1.1, 3.0]), atol=1e-6)   # bounded at 3 * |A|
    assert clipped.tolist() == [True, True, False, True]


def test_ratio_one_gives_plain_policy_gradient():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = rl.policy_loss(logp, logp.detach(), adv, 0.2, 0.28)
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)   # d/dlogp of -ratio * A at ratio 1


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert torch.allclose(rl.kl_estimate(logp, ref, "k1"), torch.tensor([0.5]))
    assert torch.allclose(rl.kl_estimate(logp, ref, "k2"), torch.tensor([0.125]))
    assert torch.allclose(rl.kl_estimate(logp, ref, "k3"), torch.tensor([math.exp(-0.5) - 1 + 0.5]))


def test_value_loss_by_hand():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0])
    # unclipped (1-0)^2=1, clipped V=0.2 -> 0.04; max -> 1 | second: (0-1)^2 = 1 both
    assert torch.allclose(rl.value_loss(v, old, ret, 0.2), torch.tensor([0.5, 0.5]))
    v = torch.tensor([0.5, 0.0])
    ret = torch.tensor([1.0, 1.0])
    # unclipped (0.5-1)^2 = 0.25; clipped V=0.2 -> 0.64; max 0.64 -> 0.32
    assert torch.allclose(rl.value_loss(v, old, ret, 0.2)[0], torch.tensor(0.32))


def test_gae_against_naive_loop_skipping_tool_tokens():
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 3, 9, 0.9, 0.8
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[2] = 0  # an empty sequence
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        # naive: the trajectory is the policy tokens only
        a_next, expect = 0.0, {}
        for k in reversed(range(len(idx))):
            t = idx[k]
            v_next = float(values[b, idx[k + 1]]) if k + 1 < len(idx) else 0.0
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            a_next = delta + gamma * lam * a_next
            expect[t] = a_next
        for t in range(T):
            want = expect.get(t, 0.0)
            assert abs(float(adv[b, t]) - want) < 1e-5
            assert abs(float(ret[b, t]) - ((want + float(values[b, t])) if t in expect else 0.0)) < 1e-5


def test_token_weights_by_hand():
    mask = torch.ones(5)
    seq = torch.tensor([0, 0, 0, 1, 1])
    assert torch.allclose(rl.token_weights(mask, seq, 2, "token_mean"), torch.full((5,), 0.2))
    # seq_mean_token_mean: 1/(3*2) for the first sequence, 1/(2*2) for the second
    assert torch.allclose(rl.token_weights(mask, seq, 2, "seq_mean_token_mean"),
                          torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 4, 1 / 4]))
    assert torch.allclose(rl.token_weights(mask, seq, 2, "seq_mean_token_sum_norm", max_len=10), torch.full((5,), 1 / 20))
    masked = rl.token_weights(torch.tensor([1.0, 0, 1, 1, 0]), seq, 2, "token_mean")
    assert torch.allclose(masked, torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3, 0.0]))


def test_masked_tokens_get_exactly_zero_gradient():
    logp = torch.randn(6, requires_grad=True)
    old = logp.detach() + 0.1 * torch.randn(6)
    adv = torch.randn(6)
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1])          # 0 = tool output / prompt / truncated
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    for agg in rl.AGGREGATIONS:
        logp.grad = None
        w = rl.token_weights(mask, seq, 2, agg, max_len=8)
        loss, _ = rl.policy_loss(logp, old, adv, 0.2, 0.28)
        kl = rl.kl_estimate(logp, old, "k3")
        ((loss + 0.1 * kl) * w).sum().backward()
        assert torch.all(logp.grad[mask == 0] == 0) and torch.all(logp.grad[mask == 1] != 0)


def test_kl_reward_to_go_by_hand():
    # penalties kl_coef * KL_t at a response's 4 policy tokens: each token is charged what comes from it on
    pen = torch.tensor([0.1, -0.2, 0.4, 0.3])
    assert torch.allclose(rl.kl_reward_to_go(pen), torch.tensor([0.6, 0.5, 0.7, 0.3]))
    assert rl.kl_reward_to_go(torch.zeros(0)).shape == (0,)
