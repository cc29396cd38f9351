"""Atomic, quantization-aware `save_pretrained` for diffusers models and pipelines with a diffusers-ptq UNet.

diffusers writes `config.json` and the weights straight into the target directory and offers no hook for
where they go, so `register()` (`registration.py`) wraps `ModelMixin.save_pretrained` and
`DiffusionPipeline.save_pretrained` once. The wrapper only acts on objects holding a diffusers-ptq UNet
(everything else runs diffusers' method untouched): it refreshes the UNet's `quantization_config` from its
`ptq_state`, runs diffusers' own method into a temporary sibling directory, and renames that into place
(`atomic.py`). `push_to_hub=True` pushes the saved folder with a diffusers-ptq model card (`upload.py`).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin

from diffusers_ptq.serialization.atomic import atomic_directory
from diffusers_ptq.serialization.quantizer import attach_quantizer, is_ptq_model
from diffusers_ptq.serialization.upload import upload_saved_folder

_MARK = "_diffusers_ptq_atomic_save"
_HUB_KWARGS = ("repo_id", "token", "private", "create_pr", "commit_message")


def install_save_hooks() -> None:
    """Wrap the save methods once (idempotent)."""
    _wrap(ModelMixin, _ptq_models_of_model)
    _wrap(DiffusionPipeline, _ptq_models_of_pipeline)


def _ptq_models_of_model(model: Any) -> list[Any]:
    return [model] if is_ptq_model(model) else []


def _ptq_models_of_pipeline(pipe: Any) -> list[Any]:
    components = getattr(pipe, "components", None) or {}
    return [c for c in components.values() if is_ptq_model(c)]


def _wrap(cls: type, ptq_models: Callable[[Any], list[Any]]) -> None:
    original = cls.__dict__.get("save_pretrained")
    if original is None or getattr(original, _MARK, False):
        return
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        models = ptq_models(self)
        if not models:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        save_directory = bound.get("save_directory")
        if not bound.get("is_main_process", True) or save_directory is None or os.path.isfile(save_directory):
            return original(self, *args, **kwargs)  # diffusers' own handling (other ranks, bad paths)
        if bound.get("safe_serialization", True) is False or bound.get("use_flashpack", False):
            raise ValueError(
                "diffusers-ptq checkpoints are written as safetensors only (never pickle or FlashPack); "
                "call save_pretrained without safe_serialization=False / use_flashpack=True"
            )
        call = {k: v for k, v in bound.items() if k not in ("self", "save_directory", "push_to_hub", var_kw)}
        extra = dict(bound.get(var_kw) or {}) if var_kw else {}
        hub = {k: extra.pop(k) for k in _HUB_KWARGS if k in extra}
        for model in models:
            attach_quantizer(model)  # the saved quantization_config reflects the model as it is now
        with atomic_directory(save_directory) as partial:
            result = original(self, os.fspath(partial), push_to_hub=False, **call, **extra)
        if bound.get("push_to_hub", False):
            repo_id = hub.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            upload_saved_folder(self, save_directory, repo_id, **hub)
        return result

    setattr(save_pretrained, _MARK, True)
    cls.save_pretrained = save_pretrained
