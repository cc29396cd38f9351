"""Method presets: each published method is a PTQConfig over shared parts, never new mechanics."""

from diffusers_ptq.methods import apq_dm, eda_dm, ptq4dm, q_diffusion
from diffusers_ptq.methods.registry import available_presets, get_preset, register_preset

__all__ = ["apq_dm", "available_presets", "eda_dm", "get_preset", "ptq4dm", "q_diffusion", "register_preset"]
