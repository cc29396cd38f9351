"""TFMQ-DM (Huang et al., CVPR 2024): temporal feature maintenance on top of Q-Diffusion.

- Temporal information block (TIAR): the time-embedding MLP and every ResNet block's time projection, whose
  only input is t, are reconstructed first as one unit on the error of all per-block time features, with
  the AdaRound regulariser (20,000 iterations, lambda 0.01, warm-up 0.2, beta 20 -> 2);
  `reconstruction.temporal_block=True`. The other blocks follow with BRECQ as in Q-Diffusion.
- Per-step activation scales (FSC): one (scale, zero-point) per sampling step, each initialised from that
  step's own samples; `activations.timestep_groups="per_step"`. So every sampling step is recorded
  (`calibration.step_interval=1`, the same number of samples as Q-Diffusion's): with every 2nd step, half
  the steps would have no samples of their own and borrow a neighbour's scales.
- Quantizers as Q-Diffusion's (TFMQ-DM's code builds on it).
"""

from diffusers_ptq.config import PTQConfig
from diffusers_ptq.methods.q_diffusion import q_diffusion, reconstruction_config
from diffusers_ptq.methods.registry import register_preset


@register_preset("tfmq-dm")
def tfmq_dm() -> PTQConfig:
    return q_diffusion().replace(
        method="tfmq-dm",
        activations={"timestep_groups": "per_step"},
        calibration={"step_interval": 1},
        reconstruction=reconstruction_config(temporal_block=True),
    )
