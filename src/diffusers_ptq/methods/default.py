"""The default recipe: what `PTQConfig()` is, and therefore what `diffusers-ptq quantize` runs.

Not a published method: the combination of the library's parts that measured best on both shipped
benchmark models (BENCHMARKS.md §8), at W8A8, W6A6 and W4A8, within minutes of CPU calibration. GPTQ
rounding of the weights; PTQD-style correction of the noise prediction's per-step mean error
(`bias_correction="output"`); the layers whose quantization alone hurts the noise prediction most kept
float, five at 4-bit weights and four above (`layers.mixed_precision`, `max_layers="auto"`, ranked on the
calibration set, so it holds on models it was not tuned on); one activation scale for all timesteps,
because finer timestep scales did not lower FD beyond noise (colour model with the correction, shipped
model without it); no block reconstruction. Weight scales per group of 64 inputs at <= 4 bits and per
output channel above (`weights.granularity="auto"`): groups won at W4A8 on the colour model and tied on
the shipped one, and tied at W6A6 / W8A8 (BENCHMARKS.md §8).
"""

from diffusers_ptq.config import PTQConfig
from diffusers_ptq.methods.registry import register_preset

# One line for `diffusers-ptq presets`.
WHY = (
    "the library's default (PTQConfig()): GPTQ + output bias correction + the most sensitive layers float "
    "(5 at <= 4 bits, else 4) + groups of 64 at <= 4 bits, G = 1; chosen on FD over both shipped models "
    "(BENCHMARKS.md §8)"
)


@register_preset("default")
def default() -> PTQConfig:
    return PTQConfig()
