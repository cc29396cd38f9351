"""Method presets: each published method is a PTQConfig over shared parts, never new mechanics."""

from diffusers_ptq.methods import apq_dm, default, eda_dm, ptq4dm, q_diffusion, tfmq_dm
from diffusers_ptq.methods.registry import available_presets, build_preset, get_preset, register_preset

__all__ = [
    "apq_dm",
    "available_presets",
    "build_preset",
    "default",
    "eda_dm",
    "get_preset",
    "ptq4dm",
    "q_diffusion",
    "register_preset",
    "tfmq_dm",
]
