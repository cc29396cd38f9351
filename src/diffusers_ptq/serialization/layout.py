"""On-disk layout of a diffusers-ptq checkpoint: key names, the manifest in the safetensors header, checksums.

A quantized UNet is saved as an ordinary diffusers model folder (`config.json` with a `quantization_config`,
`diffusion_pytorch_model.safetensors`, sharded with an index when large). The safetensors file holds:

- every tensor of the UNet as usual, except the float weight of each quantized layer, which is replaced by
  `<layer>.weight_packed`: integer codes (see `packing.py`), and its quantizers' per-channel (C_out,),
  per-tensor (1,) or per-group (C_out, K / group_size) `weight_quantizers.<i>.scale` / `.zero_point`;
- activation quantizers' per-group `scale` / `zero_point` tables; their timestep -> group maps are stored
  once as `_ptq.group_map` (int16) when they are all equal, otherwise per quantizer;
- in the header metadata (`diffusers_ptq.*`, JSON strings): the format version, the quantization plan
  (which module is quantized at which bits, shortcut splits, weight shapes and grids, attention processors,
  what stayed float and why) and a CRC-32 of every tensor, so a corrupted file fails with a clear error.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

import torch

FORMAT_VERSION = 1
PACKED_SUFFIX = ".weight_packed"
SHARED_GROUP_MAP_KEY = "_ptq.group_map"
META_FORMAT = "diffusers_ptq.format_version"
META_PLAN = "diffusers_ptq.plan"
META_CHECKSUMS = "diffusers_ptq.checksums"


class CheckpointError(ValueError):
    """A diffusers-ptq checkpoint is malformed, corrupted, too new, or does not fit the model."""


@dataclass(frozen=True)
class LayerRecord:
    """One quantized Conv2d/Linear: what `install` needs to rebuild it and how its weight is packed."""

    name: str
    kind: str  # "conv" | "linear"
    weight_bits: int
    act_bits: int | None
    split: int | None
    special: bool
    shape: tuple[int, ...]  # the float weight's shape
    dtype: str  # the float weight's dtype, e.g. "float32"
    qmin: int  # first code of the weight grid (negative: signed grid)
    # Per weight quantizer (a split layer has two): its group size, None for per-channel / per-tensor scales.
    # None for the whole field in checkpoints written before layers could get a group size other than the
    # configured one; those had it only where it divided K.
    group_sizes: tuple[int | None, ...] | None = None


@dataclass(frozen=True)
class AttentionRecord:
    """One attention block whose matmul operands are quantized."""

    name: str
    act_bits: int
    softmax_bits: int | None
    processor: str  # class name of the float processor the quantized one replaced


@dataclass
class Manifest:
    """Everything the safetensors header says about the quantized model."""

    layers: list[LayerRecord]
    attentions: list[AttentionRecord]
    kept_float: list[tuple[str, str]]
    checksums: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_metadata(self) -> dict[str, str]:
        plan = {
            "layers": [_record_to_list(r) for r in self.layers],
            "attentions": [_record_to_list(r) for r in self.attentions],
            "kept_float": [list(item) for item in self.kept_float],
        }
        return {
            META_FORMAT: str(self.format_version),
            META_PLAN: json.dumps(plan, separators=(",", ":")),
            META_CHECKSUMS: json.dumps(self.checksums, separators=(",", ":"), sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None, source: str) -> Manifest:
        """Parse and validate the header metadata of `source` (a file name, for messages)."""
        metadata = metadata or {}
        if META_FORMAT not in metadata:
            raise CheckpointError(
                f"{source} has no '{META_FORMAT}' metadata: it was not written by diffusers-ptq, or its "
                "header was rewritten; save the quantized model again with save_pretrained"
            )
        version = check_format_version(metadata[META_FORMAT], f"{source} metadata '{META_FORMAT}'")
        try:
            plan = json.loads(metadata[META_PLAN])
            checksums = json.loads(metadata[META_CHECKSUMS])
            layers = [_record_from_list(LayerRecord, item) for item in plan["layers"]]
            attentions = [_record_from_list(AttentionRecord, item) for item in plan["attentions"]]
            kept_float = [(str(n), str(r)) for n, r in plan["kept_float"]]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{source}: the diffusers-ptq plan in the header is malformed ({err})"
            ) from err
        if not isinstance(checksums, dict):
            raise CheckpointError(f"{source}: '{META_CHECKSUMS}' must be a JSON object")
        return cls(layers, attentions, kept_float, checksums, version)


def check_format_version(value: Any, where: str) -> int:
    """The format version as an int; raise if it is malformed or newer than this library reads."""
    try:
        version = int(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}={value!r} is not an integer format version") from None
    if isinstance(value, bool) or version < 1:
        raise CheckpointError(f"{where}={value!r} is not a valid format version (expected an integer >= 1)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}={version} is newer than this diffusers-ptq reads (format_version <= {FORMAT_VERSION}); "
            "upgrade diffusers-ptq (pip install -U diffusers-ptq) to load this checkpoint"
        )
    return version


def checksum(tensor: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes (8 hex digits), independent of device."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return f"{zlib.crc32(memoryview(data)) & 0xFFFFFFFF:08x}"


def _record_to_list(record: LayerRecord | AttentionRecord) -> list[Any]:
    values = asdict(record)
    return [list(v) if isinstance(v, tuple) else v for v in values.values()]


def _record_from_list(cls: type, item: Any) -> Any:
    fields = cls.__dataclass_fields__.values()
    names = [f.name for f in fields]
    required = sum(f.default is MISSING for f in fields)  # later fields may be absent from older files
    if not isinstance(item, list) or not required <= len(item) <= len(names):
        raise ValueError(f"expected a list of {len(names)} values ({', '.join(names)}), got {item!r}")
    values = dict(zip(names, item))
    if "shape" in values:
        values["shape"] = tuple(int(s) for s in values["shape"])
    if values.get("group_sizes") is not None:
        values["group_sizes"] = tuple(None if g is None else int(g) for g in values["group_sizes"])
    return cls(**values)
