"""Starting point of the group search: G distinct candidate quantizers and a first timestep -> group map.

With init="ranges", each quantizer's sampling steps are clustered (1-D k-means on the log of their
activation range width) into G groups, and each group's scale is searched on the pooled values of its
steps: steps whose ranges differ start in different groups, so the candidates differ and the search has a
real choice per timestep. (Contiguous groups can hold the same mix of ranges, which leaves the candidates
identical and the softmax with no gradient to separate them.) Steps without data join the group of the
nearest step with data.
"""

from __future__ import annotations

import torch

from diffusers_ptq.quantizers import GroupObserver, TimestepActQuantizer


def cluster_widths(widths: torch.Tensor, num_groups: int, iterations: int = 50) -> torch.Tensor:
    """k-means labels of 1-D `widths` (positive) on a log scale; label 0 is the narrowest cluster."""
    x = widths.double().clamp_min(1e-12).log()
    k = min(num_groups, int(x.unique().numel()))
    # Start from evenly spaced quantiles: deterministic, and spread over the whole range.
    centres = torch.quantile(x, torch.linspace(0, 1, k, dtype=torch.float64))
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iterations):
        labels = (x[:, None] - centres[None, :]).abs().argmin(dim=1)
        new = torch.stack([x[labels == j].mean() if (labels == j).any() else centres[j] for j in range(k)])
        if torch.equal(new, centres):
            break
        centres = new
    rank = torch.empty(k, dtype=torch.long)
    rank[centres.argsort()] = torch.arange(k)
    return rank[labels]


def _width(lo: torch.Tensor, hi: torch.Tensor, q: TimestepActQuantizer) -> torch.Tensor:
    if q.symmetric:
        return 2 * torch.maximum(hi.abs(), lo.abs())
    lo = torch.zeros_like(lo) if q.unsigned else torch.minimum(lo, torch.zeros_like(lo))
    return hi.clamp_min(0) - lo


@torch.no_grad()
def init_from_ranges(
    q: TimestepActQuantizer,
    obs: GroupObserver,
    row_of: torch.Tensor,
    row_timesteps: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Set `q`'s group map and per-group scales from per-row (per-step) statistics; return row -> group."""
    seen = obs.seen > 0
    if not seen.any():
        raise RuntimeError(f"{q.name}: no calibration activations were observed")
    seen_idx = seen.nonzero().flatten()
    labels = cluster_widths(_width(obs.lo[seen_idx], obs.hi[seen_idx], q), q.num_groups)
    # Rows without data take the label of the nearest row (in timesteps) that has data.
    dist = (row_timesteps.double()[:, None] - row_timesteps.double()[seen_idx][None, :]).abs()
    row_group = labels[dist.argmin(dim=1)]
    row_group[seen_idx] = labels
    used = sorted(labels.unique().tolist())
    for g in range(q.num_groups):
        # Fewer distinct ranges than groups: the spare groups copy the widest cluster (no step uses them).
        src = g if g in used else used[-1]
        members = seen_idx[labels == src].tolist()
        values = torch.cat([obs.values[r] for r in members])
        if values.numel() > q.max_values:
            values = values[torch.randperm(values.numel(), generator=generator)[: q.max_values]]
        q.set_group_range(g, values, obs.lo[members].min(), obs.hi[members].max())
    q.group_map.copy_(row_group.to(q.group_map.device)[row_of.to(q.group_map.device)])
    return row_group
