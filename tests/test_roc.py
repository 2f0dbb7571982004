"""GRPO-RoC (minitir/roc.py): the released code's counts, the choice of positives and negatives on constructed
groups, and the trainer's path (group statistics over the n kept)."""
import random

import pytest
import torch

from minitir import rl, roc
from minitir.trainer import Trainer
from tests.test_trainer import toy_setup


@pytest.mark.parametrize("pos,neg,n,want", [
    (31, 1, 16, (15, 1)), (28, 4, 16, (14, 2)), (27, 5, 16, (14, 2)),    # at least 2 (or all) of a class
    (2, 30, 16, (2, 14)), (32, 0, 16, (16, 0)), (0, 32, 16, (0, 16)),
    (9, 7, 8, (4, 4)), (10, 6, 8, (5, 3)), (11, 5, 8, (6, 2)),           # round(3.5) = 4, round(2.5) = 2
    (6, 18, 8, (2, 6)), (3, 4, 8, (3, 4)),                               # K = 3; fewer than n: all kept
    (3, 5, 4, (2, 2)), (1, 7, 4, (1, 3)), (7, 1, 4, (3, 1)),             # n = 4: the floors meet
])
@pytest.mark.quick
def test_kept_counts_follow_the_groups_proportion(pos, neg, n, want):
    assert roc.kept_counts(pos, neg, n) == want


@pytest.mark.quick
def test_roc_needs_room_for_both_classes():
    from minitir.config import ConfigError, TrainConfig, validate
    validate(TrainConfig(roc_oversample=2, n_samples=4))
    for bad in (dict(roc_oversample=2, n_samples=2), dict(roc_oversample=0)):
        with pytest.raises(ConfigError):
            validate(TrainConfig(**bad))


@pytest.mark.quick
def test_penalty():
    assert roc.penalty(0, 0, True) == 0.5 and roc.penalty(2, 1, True) == 0.5 and roc.penalty(3, 0, True) == 0
    assert roc.penalty(1, 1, False) == 2.0


@pytest.mark.quick
def test_positives_with_the_fewest_errors_and_negatives_uniformly():
    correct = [True] * 10 + [False] * 6
    pen = [0, 0, 0.5, 0.5, 0.5, 1, 1, 1.5, 2, 0.25] + [0] * 6      # 5 positives and 3 negatives of 8 are kept
    counts = [0] * 16
    for seed in range(3000):
        kept = roc.downsample(correct, pen, 8, random.Random(seed))
        assert len(kept) == 8 == len(set(kept)) and kept == sorted(kept)
        assert {0, 1, 9} < set(kept) and not {5, 6, 7, 8} & set(kept)   # the best three, then two of the ties
        for i in kept:
            counts[i] += 1
    assert [c / 3000 for c in counts[2:5]] == pytest.approx([2 / 3] * 3, abs=0.04)   # ties at random
    assert [c / 3000 for c in counts[10:]] == pytest.approx([0.5] * 6, abs=0.04)    # negatives uniformly


def test_the_trainer_keeps_n_per_group_and_baselines_over_them(tmp_path):
    tc, model, tok, problems = toy_setup(tmp_path, steps=1, warm=True, roc_oversample=2, prompts_per_step=4)
    t = Trainer(tc, model=model, tokenizer=tok, problems=problems, eval_problems=[])
    try:
        kept, sampled, stats = t.collect({"generate": 0.0, "grade": 0.0})
        n, k = tc.n_samples, 2 * tc.n_samples
        assert len(sampled) == tc.prompts_per_step * k and len(kept) == tc.prompts_per_step * n
        mixed = 0
        for g in range(tc.prompts_per_step):
            group, mine = sampled[g * k:(g + 1) * k], kept[g * n:(g + 1) * n]
            assert all(s in group for s in mine)
            pos = sum(s.correct for s in group)
            assert sum(s.correct for s in mine) == roc.kept_counts(pos, k - pos, n)[0]
            pen = lambda s: roc.penalty(s.completion.num_tool_calls, s.completion.num_tool_errors, s.format_ok)
            dropped = [pen(s) for s in group if s.correct and s not in mine]
            assert all(pen(s) <= min(dropped, default=9) for s in mine if s.correct)
            want = rl.group_advantages(torch.tensor([[s.reward for s in mine]]), "grpo")[0]
            assert [s.outcome_adv for s in mine] == pytest.approx(want.tolist())
            mixed += 0 < pos < k and any(pen(s) != pen(group[0]) for s in group if s.correct)
        assert mixed    # at least one group where the choice mattered
    finally:
        t.close()
