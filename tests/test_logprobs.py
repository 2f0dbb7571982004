import pytest
import torch

from minitir.logprobs import token_logprobs, token_loss

pytestmark = pytest.mark.quick   # the inner loop: pytest -m quick


def naive(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T) / temperature
    logp_all = torch.log_softmax(logits, -1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), ent


def test_chunked_logprobs_and_entropy_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    N, D, V = 37, 16, 101
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    w_lp, w_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    for temperature in (1.0, 0.7):
        lp, ent = token_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=8, with_entropy=True)
        (lp * w_lp + ent * w_ent).sum().backward()
        gh, gw = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        rlp, rent = naive(hidden, weight, targets, temperature)
        (rlp * w_lp + rent * w_ent).sum().backward()
        assert (lp - rlp).abs().max() <= 1e-5 and (ent - rent).abs().max() <= 1e-5
        assert (gh - hidden.grad).abs().max() <= 1e-5 and (gw - weight.grad).abs().max() <= 1e-5
        hidden.grad = weight.grad = None


def test_float32_chunked_matches_full():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 32, generator=g)
    weight = torch.randn(500, 32, generator=g) * 0.3
    targets = torch.randint(0, 500, (50,), generator=g)
    lp, ent = token_logprobs(hidden, weight, targets, chunk_size=7)
    assert ent is None
    assert (lp - naive(hidden, weight, targets, 1.0)[0]).abs().max() <= 1e-5


def _policy_like_loss(logp, ent, old, adv, w, use_entropy):
    """A clipped-surrogate + entropy loss, summed with token weights: what the trainer hands token_loss."""
    ratio = torch.exp(logp - old)
    obj = torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.28) * adv)
    tok = -obj - (0.01 * ent if use_entropy else 0)
    return (tok * w).sum()


@pytest.mark.parametrize("use_entropy", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_token_loss_equals_loss_on_naive_logprobs(use_entropy, temperature):
    g = torch.Generator().manual_seed(3)
    N, D, V = 37, 16, 101
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    old, _ = naive(hidden.detach() + 0.05 * torch.randn(N, D, generator=g, dtype=torch.float64), weight.detach(),
                   targets, temperature)
    adv, w = torch.randn(N, generator=g, dtype=torch.float64), torch.rand(N, generator=g, dtype=torch.float64)
    seen = []

    def loss_fn(lp, ent, rows):
        seen.append((rows.start, rows.stop))
        return _policy_like_loss(lp, ent, old[rows], adv[rows], w[rows], use_entropy)

    loss, lp, ent = token_loss(hidden, weight, targets, loss_fn, temperature=temperature, chunk_size=8,
                               with_entropy=True)
    assert seen == [(s, min(s + 8, N)) for s in range(0, N, 8)]
    assert not lp.requires_grad and not ent.requires_grad
    (3.0 * loss).backward()   # backward scales the gradient taken in forward
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    rlp, rent = naive(hidden, weight, targets, temperature)
    ref = _policy_like_loss(rlp, rent, old, adv, w, use_entropy)
    (3.0 * ref).backward()
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5
    assert (lp - rlp).abs().max() <= 1e-5 and (ent - rent).abs().max() <= 1e-5
    assert (gh - hidden.grad).abs().max() <= 1e-5 and (gw - weight.grad).abs().max() <= 1e-5


def test_fused_token_loss_float32_and_a_chunk_without_gradient():
    """float32 (the oneDNN products on x86) against autograd on full logits; a chunk whose loss does not
    depend on logp (all weights zero) contributes no gradient."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(40, 32, generator=g).requires_grad_()
    weight = (torch.randn(300, 32, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (40,), generator=g)
    w = torch.rand(40, generator=g)

    def loss_fn(lp, ent, rows):
        if rows.start >= 32:
            return torch.zeros(())
        return -(lp * w[rows]).sum()

    loss, _, _ = token_loss(hidden, weight, targets, loss_fn, chunk_size=16)
    loss.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    rlp, _ = naive(hidden, weight, targets, 1.0)
    ref = -(rlp[:32] * w[:32]).sum()
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-4
    assert (gh - hidden.grad).abs().max() <= 1e-4 and (gw - weight.grad).abs().max() <= 1e-4
    assert gh[32:].abs().max() == 0


def test_float32_chunked_gradients_match_full():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 32, generator=g).requires_grad_()
    weight = (torch.randn(300, 32, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (40,), generator=g)
    lp, ent = token_logprobs(hidden, weight, targets, chunk_size=16, with_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    rlp, rent = naive(hidden, weight, targets, 1.0)
    (rlp.sum() + 0.5 * rent.sum()).backward()
    assert (gh - hidden.grad).abs().max() <= 1e-4 and (gw - weight.grad).abs().max() <= 1e-4


def test_fused_token_loss_backward_runs_once():
    hidden = torch.randn(6, 8).requires_grad_()
    weight = torch.randn(20, 8).requires_grad_()
    loss, _, _ = token_loss(hidden, weight, torch.arange(6), lambda lp, ent, rows: -lp.sum())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()
