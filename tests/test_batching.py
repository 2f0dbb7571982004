"""Packing samples for the trainer's forward passes: a group's prompt once, every policy token scored from the
position before it, checked against a naive forward of each prompt + response."""
import pytest
import torch

from minitir import batching
from minitir.sample import Completion, Sample

pytestmark = pytest.mark.quick   # the inner loop: pytest -m quick


def make_samples(g):
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (6, 4)]
    out = []
    for prompt, n_resp in zip(prompts, (3, 2)):
        for k in range(n_resp):
            tokens = torch.randint(0, 97, (4 + 2 * k,), generator=g).tolist()
            mask = [1] * len(tokens)
            mask[2] = 0   # a tool-output token: not the policy's, not scored
            out.append(Sample(prompt_ids=prompt, completion=Completion(tokens, [0.0] * len(tokens), mask, "", "stop"),
                              gold="", loss_mask=mask))
    return out


def test_pack_scores_every_policy_token_like_a_naive_forward(tiny_pair):
    _, m = tiny_pair
    samples = make_samples(torch.Generator().manual_seed(0))
    p = batching.pack(samples, "cpu")
    assert len(p.ids) == 6 + 4 + sum(len(s.completion.tokens) for s in samples)   # each prompt once
    assert p.continues == [-1, 0, 0, 0, -1, 4, 4]
    with torch.no_grad():
        logp = m.lm_head(m.hidden_packed(p.ids, p.cu_seqlens, p.continues)[p.pred]).log_softmax(-1)
        got = logp.gather(-1, p.targets[:, None]).squeeze(-1)
        want = []
        for s in samples:
            ids = torch.tensor(s.prompt_ids + s.completion.tokens)
            full = m.lm_head(m.hidden_packed(ids, torch.tensor([0, len(ids)], dtype=torch.int32))).log_softmax(-1)
            P = len(s.prompt_ids)
            want += [full[P + j - 1, t] for j, (t, k) in enumerate(zip(s.completion.tokens, s.loss_mask)) if k]
    assert torch.allclose(got, torch.stack(want), atol=1e-5)
    assert p.seq_index.tolist() == [i for i, s in enumerate(samples) for k in s.loss_mask if k]


def test_micro_batches_count_a_shared_prompt_once():
    samples = make_samples(torch.Generator().manual_seed(1))
    first_group = 6 + sum(len(s.completion.tokens) for s in samples[:3])          # 6 + 4 + 6 + 8 = 24
    assert [len(mb) for mb in batching.micro_batches(samples, first_group)] == [3, 2]
    assert [len(mb) for mb in batching.micro_batches(samples, first_group - 1)] == [2, 2, 1]   # 6+4+6 | 6+8, 4+4 | 4+6
