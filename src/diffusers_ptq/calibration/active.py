"""APQ-DM active timestep selection: calibration data gathered in rounds, each at the least certain step.

Round 0 spreads its samples evenly over the candidate steps, so the quantizers can be initialised and the
group search has something to learn from. Every later round asks the search (the `feedback`) for the
entropy H(sigma_t) of its per-timestep group softmax, picks

    t* = argmax_t  H(sigma_t) + eta / (N_t + 1)     (paper, Eq. 12; selection.active_score="paper")
    t* = argmax_t  H(sigma_t) - eta * N_t           (released code; "code")

with N_t the rounds that already sampled step t, and captures a batch of fresh trajectories at t* through
the pipeline. Ties go to the earlier (noisier) step.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diffusers_ptq.calibration.capture import concat_calibration_sets
from diffusers_ptq.calibration.samplers import every_step_mask
from diffusers_ptq.calibration.selectors import (
    Selection,
    SelectionFeedback,
    SelectionRequest,
    register_sample_selector,
)


def active_scores(
    entropy: torch.Tensor, visits: torch.Tensor, eta: float, form: str = "paper"
) -> torch.Tensor:
    """Score of each step: high entropy and few visits win (see the module docstring for both forms)."""
    visits = visits.double()
    if form == "paper":
        return entropy.double() + eta / (visits + 1)
    if form == "code":
        return entropy.double() - eta * visits
    raise ValueError(f"selection.active_score={form!r} is invalid; expected one of 'paper', 'code'")


def round_sizes(num_samples: int, round_size: int) -> list[int]:
    """Samples per round: full rounds, then the remainder, so the total is exactly `num_samples`."""
    sizes = [round_size] * (num_samples // round_size)
    return [*sizes, num_samples % round_size] if num_samples % round_size else sizes


def spread_steps(candidates: list[int], count: int) -> list[int]:
    """`count` (at most all) candidate steps, evenly spaced from the first to the last."""
    count = min(count, len(candidates))
    picks = torch.linspace(0, len(candidates) - 1, count).round().long().unique()
    return [candidates[i] for i in picks.tolist()]


def candidate_steps(num_steps: int, exclude_noisiest: int) -> list[int]:
    if exclude_noisiest >= num_steps:
        raise ValueError(
            f"selection.active_exclude_noisiest={exclude_noisiest} leaves no step of the {num_steps}-step "
            f"schedule; expected an integer in [0, {num_steps - 1}]"
        )
    return list(range(exclude_noisiest, num_steps))


@register_sample_selector("active")
def active_selection(request: SelectionRequest, feedback: SelectionFeedback | None = None) -> Selection:
    """Gather `calibration.num_samples` samples in rounds of `selection.active_round_size`."""
    if feedback is None:
        raise ValueError(
            "calibration.selector='active' needs the group search to score steps; set "
            "group_search.enabled=True (quantize_pipeline passes the search as feedback)"
        )
    sel, calib = request.selection, request.calibration
    candidates = candidate_steps(request.num_steps, sel.active_exclude_noisiest)
    sizes = round_sizes(calib.num_samples, sel.active_round_size)
    visits = torch.zeros(request.num_steps, dtype=torch.long)

    first = spread_steps(candidates, sizes[0])
    mask = every_step_mask(first, request.num_steps, sizes[0])
    visits[first] += 1
    data = request.capture(mask, prompt_offset=0, progress=False)
    offset = mask.shape[0]
    picks: list[int] = []
    entropy = torch.zeros(request.num_steps)
    with tqdm(total=len(sizes), desc="calibration: active rounds", disable=not request.progress) as bar:
        bar.update(1)
        for size in sizes[1:]:
            entropy = feedback(data).detach().cpu().double()
            scores = active_scores(entropy[candidates], visits[candidates], sel.active_eta, sel.active_score)
            step = candidates[int(scores.argmax())]
            mask = torch.zeros(size, request.num_steps, dtype=torch.bool)
            mask[:, step] = True
            new = request.capture(mask, prompt_offset=offset, progress=False)
            data = concat_calibration_sets([data, new])
            offset += size
            visits[step] += 1
            picks.append(step)
            bar.set_postfix(step=step, entropy=f"{float(entropy[step]):.3f}")
            bar.update(1)
    per_step = torch.bincount(data.step_index, minlength=request.num_steps) // max(data.guidance_halves, 1)
    info = {
        "samples_per_step": per_step.tolist(),
        "first_round_steps": first,
        "active_picks": picks,
        "step_entropy": entropy.tolist(),
    }
    return Selection(data, info)
