"""Second-order weight rounding (GPTQ / OBQ): Hessian accumulation, the column solver, the layer walk."""

from diffusers_ptq.gptq.hessian import HessianAccumulator, input_columns
from diffusers_ptq.gptq.runner import GPTQReport, gptq_quantize, release_float_weights, solve_layer
from diffusers_ptq.gptq.solver import RankDeficientHessian, gptq_round

__all__ = [
    "GPTQReport",
    "HessianAccumulator",
    "RankDeficientHessian",
    "gptq_quantize",
    "gptq_round",
    "input_columns",
    "release_float_weights",
    "solve_layer",
]
