"""Batch invariance: one sequence's logits are the same bits whichever path computes them (a prefill alone or
among rows of other lengths, chunked, one token at a time from the cache alone or in a batch, the trainer's
packed forward) and whatever the thread count; so the trainer's log-probs equal the generator's (float32,
and bfloat16: the decode copy against the float32 masters under autocast)."""
import copy

import pytest
import torch

from minitir import ops
from minitir.checkpoint import load_model
from minitir.logprobs import token_logprobs
from minitir.model import KVCache
from tests.conftest import make_hf_model

pytestmark = pytest.mark.quick   # the inner loop: pytest -m quick

OTHERS = [5, 17, 63, 2, 31, 70, 9]   # the other rows' lengths
N = 40                               # the sequence followed


def _models(tmp_path, dtype):
    make_hf_model("qwen2-gqa-untied").save_pretrained(tmp_path)
    trainer = load_model(tmp_path)
    trainer.batch_invariant = True
    return trainer, (trainer if dtype == torch.float32 else copy.deepcopy(trainer).to(torch.bfloat16))


def _generator_paths(gen, x, others):
    """-> {path: logits [N, V]} of sequence x through the cache."""
    V = gen.config.vocab_size
    out = {}
    with torch.no_grad():
        cache = KVCache(gen.config, 1, 128)
        out["prefill alone"] = gen.forward_cached(x[None], cache, torch.tensor([0]), all_logits=True)[0]
        rows, T = torch.tensor([6, 0, 3, 1, 7, 5, 2, 4]), max(OTHERS + [N])
        ids, n = torch.zeros(8, T, dtype=torch.long), torch.tensor([N] + OTHERS)
        for b, s in enumerate([x] + others):
            ids[b, :len(s)] = s
        cache = KVCache(gen.config, 8, 128)
        out["prefill among 7"] = gen.forward_cached(ids, cache, rows, n, all_logits=True)[0, :N]
        cache = KVCache(gen.config, 1, 128)
        out["chunked"] = torch.cat([gen.forward_cached(x[None, a:b], cache, torch.tensor([0]), all_logits=True)[0]
                                    for a, b in ((0, 13), (13, 29), (29, N))])
        cache = KVCache(gen.config, 1, 128)
        out["decode alone"] = torch.cat([gen.forward_cached(x[None, t:t + 1], cache, torch.tensor([0]))
                                         for t in range(N)])
        cache = KVCache(gen.config, 8, 128)   # the others' prompts cached, then all decode together
        gen.forward_cached(ids[1:, :max(OTHERS)], cache, rows[1:], torch.tensor(OTHERS))
        step = lambda t: torch.cat([x[t:t + 1], torch.randint(0, V, (7,))])[:, None]
        out["decode among 7"] = torch.stack([gen.forward_cached(step(t), cache, rows)[0] for t in range(N)])
    return out


def _trainer_logprobs(trainer, x, others, dtype):
    """The trainer's packed forward (x last, after the others) -> log p(x[t+1] | x[:t+1]) [N - 1]."""
    seqs = others + [x]
    cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        h = trainer.hidden_packed(torch.cat(seqs), cu)[cu[-2]:cu[-1] - 1]
        return token_logprobs(h, trainer.lm_head.weight, x[1:])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_sequences_logits_are_the_same_bits_on_every_path_and_thread_count(tmp_path, dtype):
    if dtype == torch.bfloat16 and not ops._BF16:
        pytest.skip("this CPU has no native bfloat16 products")
    g = torch.Generator().manual_seed(0)
    trainer, gen = _models(tmp_path, dtype)
    x = torch.randint(0, 97, (N,), generator=g)
    others = [torch.randint(0, 97, (n,), generator=g) for n in OTHERS]
    before, ref = torch.get_num_threads(), None
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            paths = _generator_paths(gen, x, others)
            trained = _trainer_logprobs(trainer, x, others, dtype)
            ref = paths["prefill alone"] if ref is None else ref
            for name, logits in paths.items():
                assert logits.dtype == dtype and torch.equal(logits, ref), (name, threads)
            sampled = ops.log_softmax(ref[:-1]).gather(-1, x[1:, None]).squeeze(-1)   # what the sampler records
            assert torch.equal(trained, sampled), threads
    finally:
        torch.set_num_threads(before)


def test_without_batch_invariance_the_paths_differ(tmp_path):
    """What the test above guards against: SDPA's kernels in the trainer's forward move the last bits."""
    trainer, gen = _models(tmp_path, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 97, (N,), generator=g)
    others = [torch.randint(0, 97, (n,), generator=g) for n in OTHERS]
    sampled = ops.log_softmax(_generator_paths(gen, x, others)["prefill alone"][:-1]).gather(-1, x[1:, None])
    trainer.batch_invariant = False
    trained = _trainer_logprobs(trainer, x, others, torch.float32)
    assert not torch.equal(trained, sampled.squeeze(-1)) and torch.allclose(trained, sampled.squeeze(-1), atol=1e-4)
