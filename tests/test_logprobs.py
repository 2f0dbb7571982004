import torch

from minitir.logprobs import sequence_logprobs, token_logprobs


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


def test_sequence_logprobs_align_with_padded_forward(tiny_pair):
    _, m = tiny_pair
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (4, 9)]
    cu = torch.tensor([0, 4, 13], dtype=torch.int32)
    lp, _ = sequence_logprobs(m, torch.cat(seqs), cu, chunk_size=5)
    for i, s in enumerate(seqs):
        ref = torch.log_softmax(m(s[None])[0], -1)[:-1].gather(-1, s[1:, None]).squeeze(-1)
        got = lp[cu[i]:cu[i + 1]]
        assert got[0] == 0 and (got[1:] - ref).abs().max() <= 1e-5
