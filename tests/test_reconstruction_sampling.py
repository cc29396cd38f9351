"""The sampling check: a reconstruction run judged on the pipeline's final outputs, undone if they got
further from the float UNet's (reconstruction/sampling.py; issue 15, part 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ptq import PTQConfig, quantize_pipeline, reconstruct
from diffusers_ptq.calibration.driver import CalibrationDriver
from diffusers_ptq.calibration.pipelines import spec_for_class
from diffusers_ptq.initialise import set_quant_state
from diffusers_ptq.reconstruction import safeguard
from diffusers_ptq.reconstruction.report import ReconstructionReport
from diffusers_ptq.reconstruction.sampling import SamplingCheck, bias_noise, final_output, worse
from diffusers_ptq.tiny import tiny_ddim_pipeline
from reconstruction_helpers import fast_config, quantized
from test_reconstruction_safeguard import _same, _snapshot

ROWS = 10
STEPS = 3


class FakeCheck:
    """Stands in for SamplingCheck: returns the given (before, after) errors in turn."""

    def __init__(self, errors, noise=0.0):
        self.errors, self.calls, self.num_samples, self.seconds = iter(errors), [], 4, 0.25
        self.noise = noise

    def __call__(self, what="quantized"):
        self.calls.append(what)
        return next(self.errors)

    def bias_noise(self, before, after):
        assert (before, after) == ("before reconstruction", "after reconstruction")
        return self.noise


@pytest.fixture
def held_out_improves(monkeypatch):
    """The held-out rows' check sees the run as an improvement, so only the sampling check decides."""
    measured = iter([(1.0, 1.0), (0.5, 0.5)])
    monkeypatch.setattr(safeguard, "output_errors", lambda a, b: next(measured))


@pytest.mark.parametrize("after", [(2.0, 0.5), (0.5, 1.5)], ids=["mse", "bias"])
def test_a_run_whose_samples_get_worse_is_undone(held_out_improves, after):
    unet, data = quantized("unet2d", rows=ROWS)
    start = _snapshot(unet)
    check = FakeCheck([(1.0, 1.0), after])
    report = reconstruct(unet, data, fast_config(cache_batch_size=ROWS), progress=False, sampling_check=check)
    assert check.calls == ["before reconstruction", "after reconstruction"]
    assert any(u.status == "trained" for u in report.units), "units trained and kept, then the run undone"
    assert report.model_reverted and report.reverted_by == "samples"
    assert _same(unet, start), "every unit is back where the run started"
    assert (report.sampling_error_before, report.sampling_bias_before) == (1.0, 1.0)
    assert (report.sampling_error_after, report.sampling_bias_after) == after
    assert report.sampling_samples == 4 and report.sampling_seconds == 0.25
    text = str(report)
    assert "fresh samples" in text and "the whole run was undone" in text
    again = ReconstructionReport.from_dict(report.to_dict())
    assert again.to_dict() == report.to_dict() and str(again) == text


def test_a_run_whose_samples_improve_keeps_its_training(held_out_improves):
    unet, data = quantized("unet2d", rows=ROWS)
    start = _snapshot(unet)
    check = FakeCheck([(1.0, 1.0), (0.9, 0.9)])
    report = reconstruct(unet, data, fast_config(cache_batch_size=ROWS), progress=False, sampling_check=check)
    assert not report.model_reverted and report.reverted_by is None
    assert not _same(unet, start)
    assert "the whole run was undone" not in str(report)


def test_a_run_undone_on_held_out_rows_is_not_sampled_again(monkeypatch):
    measured = iter([(1.0, 1.0), (2.0, 2.0)])
    monkeypatch.setattr(safeguard, "output_errors", lambda a, b: next(measured))
    unet, data = quantized("unet2d", rows=ROWS)
    check = FakeCheck([(1.0, 1.0)])
    report = reconstruct(unet, data, fast_config(cache_batch_size=ROWS), progress=False, sampling_check=check)
    assert report.reverted_by == "held-out rows" and check.calls == ["before reconstruction"]
    assert report.sampling_error_after is None and report.sampling_bias_noise is None
    # What was sampled before the run is reported all the same.
    assert (report.sampling_error_before, report.sampling_bias_before) == (1.0, 1.0)
    assert report.sampling_samples == 4 and report.sampling_seconds == 0.25
    assert "not sampled after: the held-out check had undone the run" in str(report)


def _calibrated_tiny_ddim():
    pipe = tiny_ddim_pipeline()
    # Nearest rounding: GPTQ rewrites the float weights, and quantize_pipeline releases the originals.
    config = PTQConfig(weight_bits=4, act_bits=8, bias_correction="off", weights={"rounding": "nearest"})
    config.calibration.num_samples, config.calibration.num_inference_steps = 4, STEPS
    quantize_pipeline(pipe, config, progress=False)
    return pipe


def _driver(pipe, batch_size=2):
    return CalibrationDriver(spec_for_class(type(pipe)), STEPS, batch_size=batch_size)


@torch.no_grad()
def test_the_check_compares_final_outputs_with_the_float_unets_from_the_same_noise():
    pipe = _calibrated_tiny_ddim()
    check = SamplingCheck(pipe, _driver(pipe), num_samples=3, seed=7)
    errors = check()
    assert errors[0] > 0 and errors[1] > 0 and errors[1] <= errors[0] + 1e-12
    assert check() == errors, "the same noise every call"
    # The reference is the float pipeline from that noise: sampling with every quantizer off matches it.
    set_quant_state(pipe.unet, weights=False, acts=False)
    assert check() == (0.0, 0.0)
    set_quant_state(pipe.unet, weights=True, acts=True)
    float_pipe, generator = tiny_ddim_pipeline(), torch.Generator().manual_seed(7)
    calls = [
        float_pipe(batch_size=n, num_inference_steps=STEPS, generator=generator, output_type="np")
        for n in (2, 1)
    ]
    expected = torch.from_numpy(np.concatenate([c.images for c in calls])).float()
    torch.testing.assert_close(check.reference, expected, rtol=0, atol=1e-5)  # float conv paths differ


def test_quantize_pipeline_reports_the_check_and_can_switch_it_off():
    def run(samples):
        pipe = tiny_ddim_pipeline()
        config = PTQConfig(
            weight_bits=4,
            act_bits=8,
            bias_correction="off",
            reconstruction={"enabled": True, "iterations": 4, "act_iterations": 2, "sampling_check": samples},
        )
        config.calibration.num_samples, config.calibration.num_inference_steps = 4, STEPS
        quantize_pipeline(pipe, config, progress=False)
        return pipe.unet.ptq_state.reconstruction

    report = run(3)
    assert report["sampling_samples"] == 3 and report["sampling_seconds"] > 0
    assert report["sampling_error_before"] is not None  # recorded whichever check decides
    if report["sampling_error_after"] is not None:
        worse = (
            report["sampling_error_after"] > report["sampling_error_before"]
            or report["sampling_bias_after"] > report["sampling_bias_before"]
        )
        assert report["model_reverted"] == worse and (report["reverted_by"] == "samples") == worse
    off = run(0)
    assert off["sampling_samples"] == 0 and off["sampling_error_before"] is None


def test_final_output_takes_latents_and_np_images_and_rejects_pil():
    class Out:
        def __init__(self, images):
            self.images = images

    latents = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    assert final_output(Out(latents)).dtype == torch.float32
    assert final_output((np.zeros((2, 8, 8, 3), dtype=np.float32),)).shape == (2, 8, 8, 3)
    with pytest.raises(TypeError, match="sampling_check"):
        final_output(Out([Image.new("RGB", (8, 8))]))


def test_a_calibration_fn_cannot_be_sampled():
    pipe = tiny_ddim_pipeline()
    driver = CalibrationDriver(spec_for_class(type(pipe)), STEPS, calibration_fn=lambda p: None)
    with pytest.raises(ValueError, match="calibration_fn"):
        SamplingCheck(pipe, driver, 2, 0)


@pytest.mark.parametrize("bad", [-1, "8", True, 2.5])
def test_sampling_check_is_validated(bad):
    with pytest.raises(ValueError, match=r"reconstruction\.sampling_check="):
        fast_config(sampling_check=bad).validate()


@pytest.mark.parametrize(
    ("after", "noise", "undone"),
    [((0.5, 1.5), 0.6, False), ((0.5, 1.5), 0.4, True), ((1.5, 0.5), 10.0, True)],
    ids=["bias-rise-within-noise-kept", "bias-rise-beyond-noise-undone", "mse-rise-undone-whatever-noise"],
)
def test_the_bias_may_rise_within_its_noise_the_mean_square_not_at_all(
    held_out_improves, after, noise, undone
):
    unet, data = quantized("unet2d", rows=ROWS)
    check = FakeCheck([(1.0, 1.0), after], noise=noise)
    report = reconstruct(unet, data, fast_config(cache_batch_size=ROWS), progress=False, sampling_check=check)
    assert report.model_reverted == undone and report.sampling_bias_noise == noise
    assert f"(noise {noise:.2g})" in str(report)
    assert ReconstructionReport.from_dict(report.to_dict()).sampling_bias_noise == noise


def test_bias_noise_is_two_jackknife_standard_errors_of_the_change():
    gen = torch.Generator().manual_seed(3)
    before = torch.randn(8, 50, generator=gen) + 0.3
    after = torch.randn(8, 50, generator=gen) + 0.2

    def term(e):
        return float(e.double().mean(dim=0).pow(2).mean())

    n = len(before)
    left_out = [
        term(torch.cat([after[:i], after[i + 1 :]])) - term(torch.cat([before[:i], before[i + 1 :]]))
        for i in range(n)
    ]
    mean = sum(left_out) / n
    expected = 2 * ((n - 1) / n * sum((d - mean) ** 2 for d in left_out)) ** 0.5
    assert bias_noise(before, after) == pytest.approx(expected, rel=1e-9)
    assert bias_noise(before, before) == 0.0
    assert bias_noise(before[:1], after[:1]) == 0.0  # one sample: no margin, the strict comparison
    assert not worse((1.0, 1.0), (0.9, 1.0 + expected / 2), expected)
    assert worse((1.0, 1.0), (0.9, 1.0 + 2 * expected), expected)


def test_sampling_check_keeps_each_calls_errors_per_sample_for_the_noise():
    pipe = _calibrated_tiny_ddim()
    check = SamplingCheck(pipe, _driver(pipe), num_samples=3, seed=7)
    set_quant_state(pipe.unet, weights=False, acts=False)
    check("before reconstruction")  # the float UNet: no error
    set_quant_state(pipe.unet, weights=True, acts=True)
    check("after reconstruction")
    before, after = check.errors["before reconstruction"], check.errors["after reconstruction"]
    assert before.shape == after.shape and before.shape[0] == 3
    assert torch.equal(before, torch.zeros_like(before)) and after.abs().max() > 0
    assert check.bias_noise("before reconstruction", "after reconstruction") == bias_noise(before, after) > 0
