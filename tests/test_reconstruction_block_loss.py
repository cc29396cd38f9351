"""Each reconstruction variant lowers its unit's block loss (hard rounding, no QDrop) on a tiny UNet.

The sequential AdaRound case is in test_reconstruction_runner.py; these are EDA-DM's joint fine-grained
reconstruction (rounding and step sizes together, with the inner-layer loss), QDrop (in that joint pass)
and TFMQ-DM's temporal block. With the learning rates set to zero the loss stays exactly where it started,
so the bound fails when the optimiser does nothing.
"""

from __future__ import annotations

import pytest

from diffusers_ptq.reconstruction import reconstruction_units
from diffusers_ptq.reconstruction.trainer import Phase, TrainResult, train_unit
from reconstruction_helpers import fast_config, full_cache, quantized

ROWS = 6
ITERATIONS = 300
RESNET = "down_blocks.1.resnets.0"  # has inner layers (two convs and the time projection)
# Measured final/initial loss: joint 0.10, joint + QDrop 0.10, temporal block 0.13 (1.0 without learning).
MAX_RATIO = 0.3

CASES = {
    "joint": (
        {"optimization": "joint", "layer_loss_weight": 0.8},
        Phase("joint", learn_rounding=True, learn_scales=True, acts_on=True, loss_p=2.0),
        RESNET,
    ),
    "joint-qdrop": (
        {"optimization": "joint", "layer_loss_weight": 0.8, "qdrop_prob": 0.5},
        Phase("joint", learn_rounding=True, learn_scales=True, acts_on=True, loss_p=2.0, qdrop_prob=0.5),
        RESNET,
    ),
    "temporal": (
        {"temporal_block": True},
        Phase("weights", learn_rounding=True, learn_scales=False, acts_on=False, loss_p=2.0),
        "temporal",
    ),
}


def _train(case: str, weight_lr: float = 3e-2, act_lr: float = 4e-5) -> tuple[TrainResult, object]:
    overrides, phase, target = CASES[case]
    unet, data = quantized("unet2d", rows=ROWS)
    config = fast_config(weight_lr=weight_lr, act_lr=act_lr, **overrides)
    units = reconstruction_units(unet, config, data)
    unit = next(u for u in units if (u.kind == target if target == "temporal" else u.name == target))
    if target == RESNET:
        assert unit.inner_layers, "the inner-layer loss needs inner layers to weigh"
    cache = full_cache(unet, unit, data, ROWS, phase.acts_on)
    return train_unit(unet, cache, phase, config, ITERATIONS, progress=False), unit


@pytest.mark.parametrize("case", list(CASES))
def test_variant_lowers_its_block_loss(case: str) -> None:
    result, _ = _train(case)
    assert result.iterations == ITERATIONS
    assert result.loss_after < MAX_RATIO * result.loss_before, (result.loss_before, result.loss_after)
    assert result.rounding_binary is not None and result.rounding_binary > 0.95


def test_without_learning_the_loss_stays_put() -> None:
    # The bound above has teeth: a no-op optimiser leaves the block loss where it started.
    result, _ = _train("joint", weight_lr=0.0, act_lr=0.0)
    assert result.loss_after == pytest.approx(result.loss_before, rel=1e-6)


def test_qdrop_changes_what_is_learned() -> None:
    # QDrop keeps random activations float during training; the learned unit differs from the plain run's.
    plain, _ = _train("joint")
    dropped, _ = _train("joint-qdrop")
    assert plain.loss_before == dropped.loss_before
    assert plain.loss_after != dropped.loss_after
