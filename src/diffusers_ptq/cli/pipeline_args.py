"""The pipeline's own call arguments on the command line: --pipeline-kwargs JSON and the --init-image /
--mask-image / --control-image conveniences, shared by `quantize` and `inspect`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_pipeline_call_arguments(parser: argparse.ArgumentParser, calls: str) -> None:
    """--pipeline-kwargs and the --init-image / --mask-image / --control-image conveniences (read back with
    `pipeline_kwargs`); `calls` says which pipeline calls receive them."""
    call = parser.add_argument_group("pipeline call arguments (img2img, inpainting, ControlNet, ...)")
    call.add_argument(
        "--pipeline-kwargs",
        metavar="JSON",
        help=f"a JSON object of extra arguments for {calls}, "
        'e.g. \'{"strength": 0.6, "negative_prompt": "blurry"}\'. Prompts, steps, guidance scale, '
        "generator and output type are set by the other flags.",
    )
    call.add_argument(
        "--init-image",
        metavar="PATH",
        help="initial image (img2img, inpainting): the pipeline's `image` argument.",
    )
    call.add_argument(
        "--mask-image", metavar="PATH", help="inpainting mask (white = repaint): the `mask_image` argument."
    )
    call.add_argument(
        "--control-image",
        metavar="PATH",
        help="ControlNet / T2I-Adapter conditioning image: `control_image` where the pipeline takes it "
        "(ControlNet img2img / inpaint), else `image`.",
    )


def pipeline_kwargs(args: argparse.Namespace, pipe: Any, spec: Any) -> dict[str, Any]:
    """--pipeline-kwargs with the --init-image / --mask-image / --control-image files added, each under the
    argument name the pipeline's `__call__` uses for it."""
    kwargs: dict[str, Any] = {}
    if args.pipeline_kwargs is not None:
        try:
            kwargs = json.loads(args.pipeline_kwargs)
        except ValueError as err:
            raise ValueError(f"--pipeline-kwargs is not valid JSON: {err}") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--pipeline-kwargs must be a JSON object, got {type(kwargs).__name__}")
    conditioned = any(name in getattr(pipe, "components", {}) for name in ("controlnet", "adapter"))
    control_arg = "control_image" if spec.accepts("control_image") else "image" if conditioned else None
    init_arg = "image" if spec.accepts("image") and control_arg != "image" else None
    mask_arg = "mask_image" if spec.accepts("mask_image") else None
    for flag, path, name in (
        ("--init-image", args.init_image, init_arg),
        ("--mask-image", args.mask_image, mask_arg),
        ("--control-image", args.control_image, control_arg),
    ):
        if path is None:
            continue
        if name is None:
            raise ValueError(f"{flag} is given but {spec.name} takes no such image")
        if name in kwargs:
            raise ValueError(f"{flag} and --pipeline-kwargs both set {name!r}; give it once")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} file {path!r} does not exist")
        from diffusers.utils import load_image

        kwargs[name] = load_image(path)
    return kwargs
