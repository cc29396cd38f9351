"""CLIP score of text-to-image samples (torchmetrics), computed only when the CLIP weights are on disk.

Nothing is downloaded: the benchmark runs offline, so without torchmetrics (and what its import needs) or a
CLIP checkpoint already in the local Hugging Face cache (or a local directory), the CLIP score is skipped
with a note saying why; the noise-prediction SQNR is measured either way.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from diffusers_ptq.benchmark.metrics.fidelity import to_uint8_rgb

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
CLIP_METRIC = "CLIP score"
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# CLIPProcessor needs the image processor and a tokenizer besides the model's config.
_CONFIGS = ("config.json", "preprocessor_config.json")
_TOKENIZERS = ("tokenizer.json", "vocab.json")


def clip_model_path(model: str) -> Path | None:
    """The local directory holding `model` (a directory itself, or the cached Hub snapshot); None when
    the cache has no complete copy. Never touches the network."""
    if os.path.isdir(model):
        directory = Path(model)
    else:
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # not cached, not a valid repo id, or huggingface_hub unusable: all mean "absent"
            return None
    has = [(directory / name).is_file() for name in (*_WEIGHTS, *_CONFIGS, *_TOKENIZERS)]
    weights, configs, tokenizers = has[:2], has[2:4], has[4:]
    return directory if any(weights) and all(configs) and any(tokenizers) else None


@functools.cache
def _import_error() -> str | None:
    """Why CLIPScore cannot be imported, or None. Asked once per process: a failed import leaves part of
    the package in sys.modules, after which a second attempt can "succeed" on a broken package."""
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore  # noqa: F401
        from transformers import CLIPModel  # noqa: F401
    except Exception as err:  # ImportError, or a broken optional dependency failing while it imports
        return " ".join(f"{type(err).__name__}: {err}".split())
    return None


def clip_unavailable_reason(model: str = DEFAULT_CLIP_MODEL) -> str | None:
    """None when the CLIP score can be computed offline with `model`, else why not (one line)."""
    error = _import_error()
    if error is not None:
        return f"CLIP score skipped: torchmetrics' CLIPScore cannot be imported ({error})"
    if clip_model_path(model) is None:
        return (
            f"CLIP score skipped: no complete copy of {model} in the local Hugging Face cache "
            "(this benchmark never downloads; fetch it once with `hf download` or pass a local directory)"
        )
    return None


class ClipScore:
    """Mean CLIP score (100 x cosine of image and prompt embeddings, floored at 0) via torchmetrics."""

    def __init__(
        self, model: str = DEFAULT_CLIP_MODEL, device: torch.device | str = "cpu", batch_size: int = 64
    ) -> None:
        reason = clip_unavailable_reason(model)
        if reason is not None:
            raise RuntimeError(reason)
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        path = clip_model_path(model)

        def load() -> tuple[Any, Any]:
            # A loader instead of a model name: torchmetrics would otherwise resolve (and fetch) the name.
            return (
                CLIPModel.from_pretrained(path, local_files_only=True),
                CLIPProcessor.from_pretrained(path, local_files_only=True),
            )

        self.name = f"{CLIP_METRIC} ({model}, torchmetrics)"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.metric = CLIPScore(model_name_or_path=load).to(self.device)

    @torch.no_grad()
    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """CLIP score of images (N, C, H, W) in [-1, 1] against the prompt each was generated from."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; expected one prompt each")
        self.metric.reset()
        for start in range(0, len(images), self.batch_size):
            chunk = to_uint8_rgb(images[start : start + self.batch_size]).to(self.device)
            self.metric.update(chunk, list(prompts[start : start + self.batch_size]))
        return {CLIP_METRIC: float(self.metric.compute())}


def clip_fidelity(model: str, device: torch.device | str = "cpu") -> tuple[ClipScore | None, str | None]:
    """(metric, None) when the CLIP score can run offline, else (None, the one-line reason)."""
    reason = clip_unavailable_reason(model)
    if reason is not None:
        return None, reason
    try:
        return ClipScore(model, device), None
    except Exception as err:  # e.g. a corrupt cached checkpoint: skip the metric, keep the benchmark
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        return None, f"CLIP score skipped: loading {model} failed ({detail})"
