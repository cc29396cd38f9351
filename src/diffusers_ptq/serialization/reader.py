"""Load side, steps 3 and 4 of `loading.py`: verify each checkpoint tensor's CRC-32 and convert it.

Packed codes become the quantized float weight (bit-exact: `(code - zero_point) * scale`, the forward's own
arithmetic) once their layer's scales have been read, perhaps from a later shard; the shared timestep ->
group map is expanded; after the last shard every quantizer buffer is restored exactly as stored.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.quantizers import (
    OutputCorrection,
    TimestepActQuantizer,
    TimestepBiasTable,
    WeightQuantizer,
)
from diffusers_ptq.quantizers.groups import expand_qparam
from diffusers_ptq.serialization.layout import (
    PACKED_SUFFIX,
    SHARED_GROUP_MAP_KEY,
    CheckpointError,
    Manifest,
    checksum,
)
from diffusers_ptq.serialization.packing import unpack_codes


class CheckpointReader:
    """Per-load state: verifies and converts checkpoint tensors shard by shard."""

    def __init__(self, manifest: Manifest, model: nn.Module) -> None:
        self.manifest = manifest
        self.layers = {r.name: r for r in manifest.layers}
        # Bias tables count as quantizers: their buffers are restored exactly too, whatever torch_dtype is.
        exact = WeightQuantizer | TimestepActQuantizer | TimestepBiasTable | OutputCorrection
        self.quantizer_modules = {name for name, m in model.named_modules() if isinstance(m, exact)}
        self.shared_map_users = [
            name
            for name, m in model.named_modules()
            if isinstance(m, TimestepActQuantizer | TimestepBiasTable | OutputCorrection)
            and f"{name}.group_map" not in manifest.checksums
        ]
        self.seen: set[str] = set()
        self.pending: dict[str, torch.Tensor] = {}  # layer -> packed codes waiting for their scales
        self.qparams: dict[str, torch.Tensor] = {}  # weight quantizers' scale / zero_point by key
        self.exact: dict[str, torch.Tensor] = {}  # every quantizer buffer, as stored
        self.group_map: torch.Tensor | None = None

    def check_missing(self, missing_keys: list[str]) -> list[str]:
        """Raise if the model expects a tensor the checkpoint does not have."""
        has_shared = SHARED_GROUP_MAP_KEY in self.manifest.checksums
        users = {f"{name}.group_map" for name in self.shared_map_users}
        missing = sorted(k for k in missing_keys if not (has_shared and k in users))
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise CheckpointError(
                f"the checkpoint has no tensor for {shown}: it is incomplete or was saved from a different "
                "model; save it again"
            )
        return []

    def convert(self, shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model tensors for one shard of checkpoint tensors."""
        out: dict[str, torch.Tensor] = {}
        for key, tensor in shard.items():
            self._verify(key, tensor)
            if key == SHARED_GROUP_MAP_KEY:
                self.group_map = tensor.long()
                for name in self.shared_map_users:
                    out[f"{name}.group_map"] = self.group_map.clone()
                    self.exact[f"{name}.group_map"] = out[f"{name}.group_map"]
                continue
            if key.endswith(PACKED_SUFFIX):
                layer = key[: -len(PACKED_SUFFIX)]
                if layer not in self.layers:
                    raise CheckpointError(f"packed weight {key!r} belongs to no layer of the stored plan")
                self.pending[layer] = tensor
                continue
            if key.endswith(".group_map"):
                tensor = tensor.long()
            module_name, _, _ = key.rpartition(".")
            if module_name in self.quantizer_modules:
                self.exact[key] = tensor.clone()
                if ".weight_quantizers." in key:
                    self.qparams[key] = tensor
            out[key] = tensor
        for layer in list(self.pending):
            weight = self._dequantize(layer)
            if weight is not None:
                out[f"{layer}.weight"] = weight
                del self.pending[layer]
        return out

    def _verify(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.manifest.checksums.get(key)
        if expected is None:
            raise CheckpointError(
                f"tensor {key!r} is not listed in the checkpoint's manifest: the file was modified after "
                "diffusers-ptq saved it; save it again"
            )
        actual = checksum(tensor)
        if actual != expected:
            raise CheckpointError(
                f"tensor {key!r} fails its CRC-32 check (stored {expected}, read {actual}): the checkpoint "
                "file is corrupted; download or save it again"
            )
        self.seen.add(key)

    def _dequantize(self, layer: str) -> torch.Tensor | None:
        record = self.layers[layer]
        parts = 1 if record.split is None else 2
        qparams = []
        for i in range(parts):
            scale = self.qparams.get(f"{layer}.weight_quantizers.{i}.scale")
            zero_point = self.qparams.get(f"{layer}.weight_quantizers.{i}.zero_point")
            if scale is None or zero_point is None:
                return None  # in a later shard
            qparams.append((scale, zero_point))
        try:
            codes = unpack_codes(self.pending[layer], record.weight_bits, record.qmin, record.shape)
        except ValueError as err:
            raise CheckpointError(f"{layer}{PACKED_SUFFIX}: {err}") from err
        code_parts = [codes] if parts == 1 else [codes[:, : record.split], codes[:, record.split :]]
        weights = []
        for part, (scale, zero_point) in zip(code_parts, qparams):
            try:
                scale, zero_point = expand_qparam(scale, part.shape), expand_qparam(zero_point, part.shape)
            except ValueError as err:
                raise CheckpointError(f"layer {layer!r}: {err}") from err
            # The arithmetic of fake_quantize after rounding: (code - zero_point) * scale, in float32.
            weights.append((part - zero_point) * scale)
        weight = weights[0] if parts == 1 else torch.cat(weights, dim=1)
        dtype = getattr(torch, record.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CheckpointError(f"layer {layer!r}: {record.dtype!r} is not a floating-point weight dtype")
        return weight.to(dtype)

    def finish(self, model: nn.Module) -> None:
        """After all shards: check completeness, restore quantizer buffers exactly."""
        if self.pending:
            layer = next(iter(self.pending))
            raise CheckpointError(
                f"the checkpoint has packed weights for {layer!r} but not its weight quantizer scales"
            )
        unseen = sorted(set(self.manifest.checksums) - self.seen)
        if unseen:
            shown = ", ".join(unseen[:5]) + (f", ... ({len(unseen)} in all)" if len(unseen) > 5 else "")
            raise CheckpointError(
                f"the checkpoint is missing tensor(s) listed in its manifest: {shown}; a shard file is "
                "missing or was rewritten"
            )
        for key, tensor in self.exact.items():
            module_name, _, buffer_name = key.rpartition(".")
            module = model.get_submodule(module_name)
            current = module._buffers.get(buffer_name)
            device = current.device if current is not None and not current.is_meta else torch.device("cpu")
            module._buffers[buffer_name] = tensor.to(device)
        on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if on_meta:
            raise CheckpointError(f"no value was loaded for {on_meta[:5]}; the checkpoint is incomplete")
