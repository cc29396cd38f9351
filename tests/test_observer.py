"""GroupObserver: exact extremes and a uniform subsample that does not depend on how rows are batched or
split among ranks."""

from __future__ import annotations

import torch

from diffusers_ptq.quantizers import GroupObserver
from diffusers_ptq.quantizers.observer import element_keys


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_group_observer_exact_extremes_and_bounded_subsample():
    obs = GroupObserver(num_groups=3, max_values=64, generator=_gen(11))
    gen = _gen(12)
    x = torch.randn(10, 50, generator=gen)
    x[3, 7] = 42.0
    x[8, 1] = -17.0
    groups = torch.tensor([0, 0, 0, 0, 0, 2, 2, 2, 2, 2])
    obs.update(x, groups)
    obs.update(x[:5] * 0.5, torch.zeros(5, dtype=torch.long))
    assert obs.lo[0] == x[:5].min() and obs.hi[0] == 42.0
    assert obs.lo[2] == -17.0 and obs.hi[2] == x[5:].max()
    assert obs.seen.tolist() == [500, 0, 250]
    assert obs.values[0].numel() <= 64 and obs.values[2].numel() <= 64
    assert obs.values[1] is None
    assert obs.empty_groups() == [1]
    assert not obs.has_nonfinite()
    # Kept values come from the observed ones.
    pool = torch.cat([x[:5].reshape(-1), (x[:5] * 0.5).reshape(-1)])
    assert torch.isin(obs.values[0], pool).all()


def test_group_observer_subsample_does_not_depend_on_the_batches_or_their_split():
    """The kept values are those of smallest key over everything seen: batches in any grouping, or two
    observers of disjoint row shares merged (what ranks do), keep the same values in the same order."""
    x = torch.randn(12, 40, generator=_gen(13))
    groups = torch.tensor([0, 1] * 6)
    ids = torch.arange(12)
    whole = GroupObserver(num_groups=2, max_values=50, salt=7)
    whole.update(x, groups, ids)
    batched = GroupObserver(num_groups=2, max_values=50, salt=7)
    for start in (0, 5, 9):
        stop = {0: 5, 5: 9, 9: 12}[start]
        batched.update(x[start:stop], groups[start:stop], ids[start:stop])
    shares = [GroupObserver(num_groups=2, max_values=50, salt=7) for _ in range(2)]
    shares[0].update(x[:7], groups[:7], ids[:7])
    shares[1].update(x[7:], groups[7:], ids[7:])
    merged = GroupObserver(num_groups=2, max_values=50, salt=7)
    for share in shares:
        for g in range(2):
            merged._keep(g, share.values[g], share.keys[g])
    for g in range(2):
        assert whole.values[g].numel() == 50 and whole.seen[g] == 240
        assert torch.equal(batched.values[g], whole.values[g])
        assert torch.equal(merged.values[g], whole.values[g])
    # Another salt draws another subsample; the keys are spread evenly (a uniform draw).
    other = GroupObserver(num_groups=2, max_values=50, salt=8)
    other.update(x, groups, ids)
    assert not torch.equal(other.values[0], whole.values[0])
    keys = element_keys(torch.arange(10), 10_000, 7).reshape(-1)
    assert len(torch.unique(keys)) == 100_000
    halves = torch.bincount((keys >> 61).long(), minlength=2).tolist()
    assert abs(halves[0] - halves[1]) < 1_500  # ~3 standard deviations of a fair split
