import pytest
import torch

from minitir.model import KVCache

pytestmark = pytest.mark.quick   # the inner loop: pytest -m quick

TOL = 1e-4


def hf_logits(hf, ids, mask=None):
    pos = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def test_padded_forward_matches_transformers(tiny_pair):
    hf, m = tiny_pair
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = m(ids)
    assert (ours - hf_logits(hf, ids)).abs().max() <= TOL


def test_padded_forward_with_left_and_right_padding(tiny_pair):
    hf, m = tiny_pair
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0   # left padding
    mask[1, 7:] = 0   # right padding
    with torch.no_grad():
        ours = m(ids, attention_mask=mask)
    ref = hf_logits(hf, ids, mask)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= TOL


def test_packed_forward_matches_per_sequence(tiny_pair):
    hf, m = tiny_pair
    g = torch.Generator().manual_seed(3)
    lengths = [5, 11, 1, 8]
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        logits = m.lm_head(m.hidden_packed(torch.cat(seqs), cu))
    for i, s in enumerate(seqs):
        ref = hf_logits(hf, s[None])[0]
        assert (logits[cu[i]:cu[i + 1]] - ref).abs().max() <= TOL


def test_shared_prompt_packing(tiny_pair):
    """A prompt packed once and continued by three responses (as a GRPO group trains): the same logits as
    transformers on each prompt + response, and the same gradients as packing the prompt three times, for a
    loss on the responses, in every checkpointing mode."""
    hf, m = tiny_pair
    g = torch.Generator().manual_seed(4)
    prompt, responses = torch.randint(0, 97, (7,), generator=g), [torch.randint(0, 97, (n,), generator=g) for n in (5, 1, 6)]
    shared_ids, shared_cu = torch.cat([prompt] + responses), torch.tensor([0, 7, 12, 13, 19], dtype=torch.int32)
    full_ids = torch.cat([torch.cat([prompt, r]) for r in responses])
    full_cu = torch.tensor([0, 12, 20, 33], dtype=torch.int32)
    with torch.no_grad():
        logits = m.lm_head(m.hidden_packed(shared_ids, shared_cu, [-1, 0, 0, 0]))
    for i, r in enumerate(responses):
        ref = hf_logits(hf, torch.cat([prompt, r])[None])[0]
        assert (logits[:7] - ref[:7]).abs().max() <= TOL
        assert (logits[shared_cu[i + 1]:shared_cu[i + 2]] - ref[7:]).abs().max() <= TOL
    shared_resp = torch.arange(7, 19)
    full_resp = torch.cat([torch.arange(a + 7, b) for a, b in ((0, 12), (12, 20), (20, 33))])
    m.train()
    for ckpt in ("none", "selective", "full"):
        m.checkpointing = ckpt
        grads = []
        for ids, cu, cont, resp in ((shared_ids, shared_cu, [-1, 0, 0, 0], shared_resp), (full_ids, full_cu, None, full_resp)):
            m.zero_grad()
            m.lm_head(m.hidden_packed(ids, cu, cont)[resp]).square().sum().backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    m.checkpointing = "none"


def test_kv_cache_prefill_then_decode(tiny_pair):
    """Rows of different lengths in one right-padded prefill, a chunked second prefill, then decode steps,
    through a cache with more rows than the batch (rows addressed by index)."""
    hf, m = tiny_pair
    g = torch.Generator().manual_seed(4)
    cache = KVCache(m.config, rows=5, max_len=40)
    rows = torch.tensor([3, 0, 4])
    lengths = [6, 9, 2]
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]
    batch = torch.zeros(3, 9, dtype=torch.long)
    for b, s in enumerate(seqs):
        batch[b, :len(s)] = torch.tensor(s)
    logits = m.forward_cached(batch, cache, rows, torch.tensor(lengths))
    for b, s in enumerate(seqs):
        assert (logits[b] - hf_logits(hf, torch.tensor([s]))[0, -1]).abs().max() <= TOL
    # chunked prefill: 3 more tokens for row 0 only, returning every position's logits
    extra = torch.randint(0, 97, (1, 3), generator=g)
    all_logits = m.forward_cached(extra, cache, rows[:1], all_logits=True)
    seqs[0] += extra[0].tolist()
    ref = hf_logits(hf, torch.tensor([seqs[0]]))[0, -3:]
    assert (all_logits[0] - ref).abs().max() <= TOL
    for step in range(5):
        nxt = torch.randint(0, 97, (3, 1), generator=g)
        logits = m.forward_cached(nxt, cache, rows)
        for b in range(3):
            seqs[b].append(int(nxt[b, 0]))
            assert (logits[b] - hf_logits(hf, torch.tensor([seqs[b]]))[0, -1]).abs().max() <= TOL, step
    assert cache.seqlens[rows].tolist() == [len(s) for s in seqs]


def test_kv_cache_overflow_is_a_clear_error(tiny_pair):
    _, m = tiny_pair
    cache = KVCache(m.config, rows=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        m.forward_cached(torch.zeros(1, 5, dtype=torch.long), cache, torch.tensor([0]))


def test_gradient_checkpointing_same_gradients(tiny_pair):
    _, m = tiny_pair
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    m.train()
    grads = []
    for ckpt in ("none", "selective", "full"):
        m.checkpointing = ckpt
        m.zero_grad()
        m.lm_head(m.hidden_packed(ids, cu)).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, atol=1e-6)


def test_smollm_greedy_matches_transformers(smollm, smollm_hf):
    """32 greedy tokens through the KV cache equal transformers' greedy generate on the same weights."""
    model, tok = smollm
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = smollm_hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.eos_token_id)[0, prompt.shape[1]:].tolist()
    cache = KVCache(model.config, rows=1, max_len=64)
    logits = model.forward_cached(prompt, cache, torch.tensor([0]))
    out = []
    for _ in range(32):
        nxt = int(logits[0].argmax())
        out.append(nxt)
        logits = model.forward_cached(torch.tensor([[nxt]]), cache, torch.tensor([0]))
    assert out == ref


def test_gradients_match_transformers(tiny_pair):
    """The hand-written backward passes (minitir.ops, minitir.logprobs) against transformers' autograd."""
    from minitir.logprobs import token_logprobs
    hf, m = tiny_pair
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (7, 12)]
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    m.train()
    m.checkpointing = "selective"
    ids = torch.cat(seqs)
    scored = torch.ones(len(ids), dtype=torch.bool)
    scored[cu[1:].long() - 1] = False   # a sequence's last position predicts nothing
    logp, ent = token_logprobs(m.hidden_packed(ids, cu)[scored], m.lm_head.weight, ids.roll(-1)[scored],
                               chunk_size=5, with_entropy=True)
    (logp.sum() + 0.1 * ent.sum()).backward()
    hf.zero_grad()
    total = 0
    for s in seqs:
        lp_all = torch.log_softmax(hf(s[None]).logits[0, :-1], -1)
        total = total + lp_all.gather(-1, s[1:, None]).sum() - 0.1 * (lp_all.exp() * lp_all).sum()
    total.backward()
    ours = dict(m.named_parameters())
    for name, p in hf.named_parameters():
        assert (ours[name].grad - p.grad).abs().max() <= 1e-4 * max(1.0, p.grad.abs().max()), name
