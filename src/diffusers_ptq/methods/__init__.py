"""Method presets: each published method is a PTQConfig over shared parts, never new mechanics."""

from diffusers_ptq.methods import ptq4dm, q_diffusion
from diffusers_ptq.methods.registry import available_presets, get_preset, register_preset

__all__ = ["available_presets", "get_preset", "ptq4dm", "q_diffusion", "register_preset"]
