"""Calibration sample selectors: random (today's sampler), EDA-DM density/diversity, APQ-DM active rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_ptq import PTQConfig, available_selectors, quantize_pipeline
from diffusers_ptq.calibration import (
    SelectionRequest,
    StepGrams,
    allocate_samples,
    allocation_mask,
    get_pipeline_spec,
    planned_timesteps,
    recording_mask,
    select_calibration,
    tdac_weights,
)
from diffusers_ptq.calibration.active import active_scores, round_sizes, spread_steps
from diffusers_ptq.config import CalibrationConfig, SelectionConfig
from diffusers_ptq.methods import get_preset

T = 1000


def _request(pipe, calib: CalibrationConfig, selection: SelectionConfig | None = None, steps=8, prompts=None):
    return SelectionRequest(
        pipe=pipe,
        spec=get_pipeline_spec(pipe),
        calibration=calib,
        selection=selection or SelectionConfig(),
        step_timesteps=planned_timesteps(pipe, steps),
        num_train_timesteps=T,
        num_inference_steps=steps,
        prompts=prompts,
        generator=torch.Generator().manual_seed(calib.seed),
        progress=False,
    )


def _per_step(data, steps: int) -> list[int]:
    return (torch.bincount(data.step_index, minlength=steps) // data.guidance_halves).tolist()


def test_available_selectors():
    assert set(available_selectors()) == {"random", "density_diversity", "active"}


# ----------------------------------------------------------------------------------------------- random


def _every_unet_input(pipe, trajectories: int, batch_size: int, steps: int, seed: int) -> dict:
    """{(trajectory, step): x_t} from plain pipeline runs, `batch_size` trajectories a run, recorded by a
    hook of this test's own: the reference the selector is compared with, independent of `capture`."""
    seen: dict[tuple[int, int], torch.Tensor] = {}
    first, call = [0], [0]

    def hook(module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        for j in range(sample.shape[0]):
            seen[(first[0] + j, call[0])] = sample[j].clone()
        call[0] += 1

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    generator = torch.Generator().manual_seed(seed)
    try:
        for start in range(0, trajectories, batch_size):
            first[0], call[0] = start, 0
            n = min(batch_size, trajectories - start)
            pipe(batch_size=n, num_inference_steps=steps, generator=generator, output_type="np")
    finally:
        handle.remove()
    return seen


def test_random_selector_records_the_pipelines_own_trajectories(ddim_pipe):
    calib = CalibrationConfig(sampler="skew_normal", num_samples=12, batch_size=4, seed=3)
    selection = select_calibration(_request(ddim_pipe, calib))
    data = selection.data
    planned = planned_timesteps(ddim_pipe, 8)
    mask = recording_mask(calib, planned, T, torch.Generator().manual_seed(calib.seed))
    assert int(mask.sum()) == len(data) == 12
    # Which (trajectory, step) rows were kept: exactly the sampler's mask, each once.
    kept = sorted(zip(data.trajectory.tolist(), data.step_index.tolist()))
    assert kept == sorted(map(tuple, mask.nonzero().tolist()))
    assert torch.equal(data.timesteps.double(), planned[data.step_index].double())
    # Each row is the x_t the unhooked DDIM loop fed its UNet at that step (DDIM with eta = 0 draws only
    # the initial noise, so stopping a run early leaves the generator where a full run would).
    reference = _every_unet_input(ddim_pipe, mask.shape[0], calib.batch_size, 8, calib.seed)
    for row, key in enumerate(zip(data.trajectory.tolist(), data.step_index.tolist())):
        assert torch.equal(data.inputs["sample"][row], reference[key]), key
    assert selection.info["samples_per_step"] == mask.sum(dim=0).tolist()


def test_existing_presets_keep_the_random_selector():
    for name in ("ptq4dm", "q-diffusion"):
        preset = get_preset(name)
        assert preset.calibration.selector == "random"
        assert preset.group_search.enabled is False
    assert PTQConfig().calibration.selector == "random"


# ------------------------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("num_samples", [1, 7, 64, 255, 1024])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_sums_exactly_and_stays_within_one_of_the_share(num_samples, seed):
    w = torch.rand(37, generator=torch.Generator().manual_seed(seed)) * (torch.arange(37) % 3)
    counts = allocate_samples(w, num_samples)
    assert int(counts.sum()) == num_samples
    share = num_samples * w.double() / w.sum()
    assert ((counts - share).abs() < 1).all()
    assert (counts[w == 0] == 0).all()
    assert torch.equal(counts, allocate_samples(w, num_samples))  # deterministic


def test_allocation_edge_cases():
    assert allocate_samples(torch.tensor([1.0, 1.0, 2.0]), 8).tolist() == [2, 2, 4]
    assert allocate_samples(torch.zeros(4), 6).tolist() == [2, 2, 1, 1]  # all alike: even, ties to early
    with pytest.raises(ValueError, match="finite"):
        allocate_samples(torch.tensor([1.0, float("nan")]), 4)


def test_allocation_mask_records_each_step_its_count():
    counts = torch.tensor([0, 3, 1, 5])
    mask = allocation_mask(counts, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 4)
    assert mask.sum(dim=0).tolist() == counts.tolist()


# ------------------------------------------------------------------------------------ density/diversity


def _reference_tdac(features: torch.Tensor, radius: float, lam: float):
    """Literal EDA-DM definitions with loops (features: (S, rows, C, P), channels on dim 2)."""
    steps = features.shape[0]
    density = torch.zeros(steps, dtype=torch.float64)
    diversity = torch.zeros(steps, dtype=torch.float64)
    for t in range(steps):
        for s in range(steps):
            if s == t:
                continue
            density[t] += float(((features[t] - features[s]) ** 2).mean() <= radius)
            cos = torch.nn.functional.cosine_similarity(features[t], features[s], dim=1, eps=1e-12)
            diversity[t] += (1 - cos).sum()

    def mm(x):
        return (x - x.min()) / (x.max() - x.min())

    return density, diversity, mm(density) + lam * mm(diversity)


def test_tdac_on_a_constructed_case_with_known_density_and_diversity():
    # Steps 0-2 share one feature (a dense cluster), step 3 is far away and orthogonal to it.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])
    features = torch.stack([e1, e1, e1, e2])[:, None, :, None, None]  # (S, rows=1, C=2, H=1, W=1)
    grams = StepGrams.empty(4)
    grams.add(features)
    scores = tdac_weights(grams, radius=0.5, diversity_weight=2.0)
    assert scores.density.tolist() == [2, 2, 2, 0]
    assert scores.diversity.tolist() == pytest.approx([1, 1, 1, 3])
    assert scores.weights.tolist() == pytest.approx([1, 1, 1, 2])  # minmax(rho) + 2 * minmax(delta)
    assert allocate_samples(scores.weights, 10).tolist() == [2, 2, 2, 4]


@pytest.mark.parametrize("shape", [(6, 3, 4, 5, 2), (6, 3, 7, 4), (6, 3, 9)])
def test_tdac_grams_match_the_literal_definition(shape):
    gen = torch.Generator().manual_seed(0)
    # Steps drift apart slowly, so some pairs fall inside the radius and some do not.
    base = torch.randn(shape[1:], generator=gen)
    noise = [0.2 * torch.randn(shape[1:], generator=gen) for _ in range(6)]
    feats = torch.stack([base * (1 + 0.3 * s) + noise[s] for s in range(6)])
    grams = StepGrams.empty(6)
    grams.add(feats[:, :2])  # two chunks of trajectories, as the feature pass accumulates them
    grams.add(feats[:, 2:])
    scores = tdac_weights(grams, radius=0.5, diversity_weight=1.2)
    chan_first = torch.stack([_channels_first(f) for f in feats])
    density, diversity, weights = _reference_tdac(chan_first.double(), 0.5, 1.2)
    assert 0 < density.sum() < 30  # the case is not degenerate
    assert scores.density.tolist() == density.tolist()
    torch.testing.assert_close(scores.diversity, diversity)
    torch.testing.assert_close(scores.weights, weights)


def _channels_first(f: torch.Tensor) -> torch.Tensor:
    """(rows, C, positions) from conv maps (rows, C, H, W), tokens (rows, L, C) or vectors (rows, C)."""
    if f.ndim == 4:
        return f.reshape(f.shape[0], f.shape[1], -1)
    if f.ndim == 3:
        return f.transpose(1, 2)
    return f[..., None]


def test_density_diversity_selector_allocates_by_the_feature_pass(ddim_pipe):
    calib = CalibrationConfig(selector="density_diversity", num_samples=20, batch_size=4)
    selection_cfg = SelectionConfig(feature_samples=6, density_radius=1e-3, diversity_weight=1.0)
    seen = []
    hook = ddim_pipe.unet.mid_block.attentions[0].register_forward_pre_hook(lambda m, a: seen.append(1))
    selection = select_calibration(_request(ddim_pipe, calib, selection_cfg))
    hook.remove()
    info = selection.info
    assert sum(info["samples_per_step"]) == 20
    assert _per_step(selection.data, 8) == info["samples_per_step"]
    assert len(seen) >= 2 * 8  # the feature pass ran every step of two chunks (6 trajectories, batch 4)
    assert len(info["density"]) == len(info["diversity"]) == len(info["step_weights"]) == 8
    # The allocation follows the weights: proportional within one sample.
    share = 20 * torch.tensor(info["step_weights"]) / sum(info["step_weights"])
    assert ((torch.tensor(info["samples_per_step"]) - share).abs() < 1).all()


@pytest.mark.slow  # ~29 s on 2 CPU cores
def test_density_diversity_through_quantize_pipeline_with_cycled_prompts(sd_pipe, prompts):
    config = PTQConfig(
        weights={"num_candidates": 10},
        activations={"num_candidates": 10},
        calibration={"selector": "density_diversity"},
        selection={"feature_samples": 2, "density_radius": 0.3, "diversity_weight": 5.0},
    )
    quantize_pipeline(
        sd_pipe,
        config,
        prompts=prompts[:2],
        num_samples=12,
        num_inference_steps=4,
        batch_size=4,
        progress=False,
    )
    state = sd_pipe.unet.ptq_state
    assert sum(state.selection["samples_per_step"]) == 12
    assert state.report.calibration_rows == 24  # both guidance halves


def test_bad_feature_module_is_rejected_before_any_model_runs(ddim_pipe):
    calls = []
    ddim_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    config = PTQConfig(
        calibration={"selector": "density_diversity"}, selection={"feature_module": "mid.attn"}
    )
    with pytest.raises(ValueError) as info:
        quantize_pipeline(ddim_pipe, config, num_samples=4, num_inference_steps=4, progress=False)
    msg = str(info.value)
    assert "selection.feature_module='mid.attn'" in msg and "mid_block.attentions.0" in msg
    assert not calls


def test_feature_module_off_the_path_is_named(ddim_pipe):
    calib = CalibrationConfig(selector="density_diversity", num_samples=4)
    # conv_norm_out runs once per call, but a module the UNet never calls cannot give a feature.
    ddim_pipe.unet.add_module("unused", torch.nn.Identity())
    with pytest.raises(RuntimeError, match="unused did not run"):
        sel = SelectionConfig(feature_module="unused", feature_samples=2)
        select_calibration(_request(ddim_pipe, calib, sel))


# ------------------------------------------------------------------------------------------------ active


def test_active_score_prefers_unvisited_high_entropy_steps():
    entropy = torch.tensor([0.1, 2.0, 2.0, 0.5, 1.9])
    visits = torch.tensor([0, 3, 0, 0, 0])
    for form in ("paper", "code"):
        scores = active_scores(entropy, visits, eta=1.5, form=form)
        assert int(scores.argmax()) == 2  # unvisited and as uncertain as the visited step 1
        assert scores[2] > scores[1] > scores[0] or form == "code"
    # Equal entropy: the visit term alone decides (paper: eta / (N + 1)).
    flat = active_scores(torch.ones(3), torch.tensor([2, 0, 1]), eta=1.5, form="paper")
    assert flat.tolist() == pytest.approx([1.5, 2.5, 1.75])
    with pytest.raises(ValueError, match="active_score"):
        active_scores(entropy, visits, 1.5, form="other")


def test_round_sizes_and_spread():
    assert round_sizes(50, 16) == [16, 16, 16, 2]
    assert round_sizes(32, 16) == [16, 16]
    assert spread_steps(list(range(2, 10)), 3) == [2, 6, 9]
    assert spread_steps([4, 5], 8) == [4, 5]


def test_active_rounds_follow_entropy_and_visits(ddim_pipe):
    # A stand-in for the group search: fixed entropies, high at steps 5 and 6, highest at 6.
    entropy = torch.tensor([0.1, 0.1, 0.2, 0.1, 0.1, 1.0, 1.2, 0.1])
    calls = []

    def feedback(data):
        calls.append(len(data))
        return entropy

    calib = CalibrationConfig(selector="active", num_samples=14, batch_size=4)
    sel = SelectionConfig(active_round_size=3, active_eta=1.5, active_exclude_noisiest=1)
    selection = select_calibration(_request(ddim_pipe, calib, sel), feedback)
    info = selection.info
    assert info["first_round_steps"] == [1, 4, 7]  # spread over the candidates, step 0 excluded
    # Unvisited high-entropy steps first (6, then 5), then the visit term brings in unvisited steps.
    assert info["active_picks"][:2] == [6, 5]
    assert 0 not in info["active_picks"]
    assert calls == [3, 6, 9, 12]  # the search saw the data gathered so far before every round
    assert sum(info["samples_per_step"]) == 14
    rounds = selection.data.step_index[3:].reshape(-1)
    picks = info["active_picks"]
    sizes = round_sizes(14, 3)[1:]
    expected = torch.cat([torch.full((n,), p) for p, n in zip(picks, sizes)])
    assert torch.equal(rounds, expected)  # every later round recorded only its chosen step
    # Each round is a fresh batch of trajectories.
    assert len(set(selection.data.trajectory.tolist())) == 1 + sum(sizes)


def test_active_code_form_penalises_revisits(ddim_pipe):
    entropy = torch.tensor([0.0, 0.0, 0.0, 3.0])
    calib = CalibrationConfig(selector="active", num_samples=8, batch_size=2)
    # Round 0 visits steps 0 and 3. Paper: 3 + 1/(N + 1) beats 0 + 1 every time; code: 3 - N drops to a
    # tie with the unvisited steps' 0 after two picks, and the earlier step wins the tie.
    for form, expected in (("paper", [3, 3, 3]), ("code", [3, 3, 1])):
        sel = SelectionConfig(active_round_size=2, active_score=form, active_eta=1.0)
        picks = select_calibration(_request(ddim_pipe, calib, sel, steps=4), lambda d: entropy).info
        assert picks["active_picks"] == expected
    sel = SelectionConfig(active_round_size=2, active_score="code", active_eta=2.0)
    picks = select_calibration(_request(ddim_pipe, calib, sel, steps=4), lambda d: entropy).info
    assert picks["active_picks"][0] == 3 and picks["active_picks"][1] != 3  # 3 - 2 * 2 < 0 - 2 * 1


def test_active_needs_feedback_and_a_step_left(ddim_pipe):
    calib = CalibrationConfig(selector="active", num_samples=4)
    with pytest.raises(ValueError, match=r"group_search\.enabled=True"):
        select_calibration(_request(ddim_pipe, calib))
    calls = []
    ddim_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    config = PTQConfig.preset("apq-dm", selection={"active_exclude_noisiest": 4})
    with pytest.raises(ValueError, match=r"selection\.active_exclude_noisiest=4.*\[0, 3\]"):
        quantize_pipeline(ddim_pipe, config, num_samples=4, num_inference_steps=4, progress=False)
    assert not calls


def test_apq_dm_preset_runs_active_selection_with_the_group_search(ddim_pipe):
    config = PTQConfig.preset(
        "apq-dm",
        weights={"num_candidates": 10},
        activations={"num_candidates": 10, "timestep_groups": 4},
        selection={"active_round_size": 4},
        group_search={"num_images": 4, "epochs": 1, "batch_size": 8},
    )
    quantize_pipeline(ddim_pipe, config, num_samples=12, num_inference_steps=6, batch_size=4, progress=False)
    state = ddim_pipe.unet.ptq_state
    assert sum(state.selection["samples_per_step"]) == 12
    assert len(state.selection["active_picks"]) == 2
    # One epoch per earlier round (with constant lr), then the final epoch.
    assert len(state.group_search["epoch_losses"]) == 3
    assert state.config.calibration.selector == "active"
    out = ddim_pipe(batch_size=1, num_inference_steps=6, output_type="np").images
    assert np.isfinite(out).all() and out.std() > 0
