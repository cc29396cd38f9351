"""Block map and block cache on tiny UNet2DModel, Stable Diffusion and SDXL UNets."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from diffusers_ptq import set_quant_state
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.quantizers import TimestepActQuantizer
from diffusers_ptq.reconstruction import ReconstructionConfig, build_cache, reconstruction_units
from diffusers_ptq.reconstruction.units import main_output
from reconstruction_helpers import fast_config, quantized


@pytest.fixture(scope="module")
def unet2d():
    return quantized("unet2d")


@pytest.fixture(scope="module")
def sd():
    return quantized("sd")


@pytest.fixture(scope="module")
def sdxl():
    return quantized("sdxl")


def _coverage(unet, units):
    layers = [n for n, m in unet.named_modules() if isinstance(m, QuantLayerMixin)]
    acts = [n for n, m in unet.named_modules() if isinstance(m, TimestepActQuantizer)]
    owned_layers = Counter(n for u in units for n in u.layers)
    owned_acts = Counter(n for u in units for n in u.act_quantizers)
    assert owned_layers == Counter(layers), "every quantized layer belongs to exactly one unit"
    assert owned_acts == Counter(acts), "every activation quantizer belongs to exactly one unit"


def test_unet2d_units_cover_every_quantizer_in_execution_order(unet2d):
    unet, data = unet2d
    units = reconstruction_units(unet, ReconstructionConfig(), data)
    _coverage(unet, units)
    kinds = {u.name: u.kind for u in units}
    assert kinds["down_blocks.0.resnets.0"] == "resnet"
    assert kinds["down_blocks.1.attentions.0"] == "attention"
    assert kinds["down_blocks.0.downsamplers.0"] == "sample" and kinds["up_blocks.0.upsamplers.0"] == "sample"
    assert kinds["conv_in"] == kinds["conv_out"] == kinds["time_embedding.linear_1"] == "layer"
    names = [u.name for u in units]
    # Execution order, not registration order (which puts up_blocks before mid_block).
    assert names.index("mid_block.resnets.1") < names.index("up_blocks.0.resnets.0")
    assert names.index("conv_in") < names.index("down_blocks.0.resnets.0") and names[-1] == "conv_out"
    resnet = next(u for u in units if u.name == "up_blocks.0.resnets.0")
    assert f"{resnet.name}.time_emb_proj" in resnet.layers and resnet.inner_layers == resnet.layers
    assert next(u for u in units if u.kind == "sample").inner_layers == []  # one layer: nothing inner


def test_stable_diffusion_and_sdxl_use_transformer_blocks(sd, sdxl):
    for unet, data in (sd, sdxl):
        units = reconstruction_units(unet, ReconstructionConfig(), data)
        _coverage(unet, units)
        kinds = Counter(u.kind for u in units)
        assert kinds["transformer"] >= 3 and kinds["resnet"] >= 6 and "attention" not in kinds
        assert any(u.name.endswith("attentions.0.proj_in") and u.kind == "layer" for u in units)
    xl_units = reconstruction_units(sdxl[0], ReconstructionConfig(), sdxl[1])
    assert {"add_embedding.linear_1", "add_embedding.linear_2"} <= {u.name for u in xl_units}
    whole = reconstruction_units(sd[0], ReconstructionConfig(transformer_unit="model"), sd[1])
    _coverage(sd[0], whole)
    assert {u.kind for u in whole} >= {"transformer_model"} and not any(
        u.name.endswith("proj_in") for u in whole
    )


def test_temporal_block_owns_time_embedding_and_every_time_projection(sdxl):
    unet, data = sdxl
    units = reconstruction_units(unet, ReconstructionConfig(temporal_block=True), data)
    _coverage(unet, units)
    temporal = next(u for u in units if u.kind == "temporal")
    projections = [n for n in temporal.layers if n.endswith("time_emb_proj")]
    resnets = [u for u in units if u.kind == "resnet"]
    assert len(projections) == len(resnets) == len(temporal.resnets)
    assert {"time_embedding.linear_1", "time_embedding.linear_2"} <= set(temporal.layers)
    assert all(not n.endswith("time_emb_proj") for u in resnets for n in u.layers)
    names = [u.name for u in units]
    # After the embeddings it adds to (SDXL's text-time embedding), before the first ResNet block.
    assert (
        names.index("add_embedding.linear_2") < names.index("temporal_block") < names.index(resnets[0].name)
    )


def _output_modules(unet, unit):
    if unit.kind == "temporal":
        return [unet.get_submodule(f"{r}.time_emb_proj") for r in unit.resnets]
    return [unit.module(unet)]


def _hooked_outputs(unet, data, modules, batch_size, quantized):
    """Each module's output over all rows, from plain full forwards of the (float or quantized) UNet."""
    set_quant_state(unet, weights=quantized, acts=quantized)
    seen = {i: [] for i in range(len(modules))}
    hooks = [
        m.register_forward_hook(lambda m, a, out, i=i: seen[i].append(main_output(out)))
        for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                unet(**data.unet_kwargs(slice(start, start + batch_size)))
    finally:
        for h in hooks:
            h.remove()
        set_quant_state(unet, weights=True, acts=True)
    return [torch.cat(seen[i]) for i in range(len(modules))]


def _hooked_inputs(unet, data, module):
    seen = []
    hook = module.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            unet(**data.unet_kwargs(slice(None)))
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("kind", ["unet2d", "sd", "sdxl"])
def test_cache_matches_hooked_forward_and_replays_every_unit(kind, request):
    unet, data = request.getfixturevalue(kind)
    config = fast_config(temporal_block=True)
    rows = torch.arange(len(data))
    units = reconstruction_units(unet, config, data)
    first = {}
    for u in units:
        first.setdefault(u.kind, u)
    picked = [first[k] for k in ("temporal", "transformer", "attention") if k in first] + [
        next(u for u in units if u.kind == "resnet" and u.name.startswith("up_blocks")),  # skip-concat input
        units[-1],
    ]
    cpu = torch.device("cpu")
    for unit in picked:
        cache = build_cache(
            unet, unit, data, rows, batch_size=len(data), cache_dtype="float32", quant_state=(True, True)
        )
        assert len(cache) == len(data) and torch.equal(cache.timesteps, data.train_timesteps)
        batch = cache.batch(rows, cpu, torch.float32)
        if unit.kind != "temporal":
            # Exactly what the block receives in a full quantized forward, conditioning included.
            args, kwargs = _hooked_inputs(unet, data, unit.module(unet))
            ref = [*args, *kwargs.values()]
            got = [*batch.args, *batch.kwargs.values()]
            assert len(got) == len(ref)
            for a, b in zip(got, ref):
                assert torch.equal(a, b) if torch.is_tensor(b) else a == b
            if unit.kind == "transformer":
                assert torch.is_tensor(batch.kwargs["encoder_hidden_states"])
        modules = _output_modules(unet, unit)
        # Targets are the float model's outputs.
        fp = _hooked_outputs(unet, data, modules, len(data), quantized=False)
        assert len(cache.targets) == len(fp)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(cache.targets, fp)), unit.name
        # Replaying the cached inputs through the quantized unit gives the quantized model's own outputs.
        with torch.no_grad(), unet.ptq_state.context.use(batch.timesteps):
            replay, _ = unit.run(unet, batch.args, batch.kwargs)
        quant = _hooked_outputs(unet, data, modules, len(data), quantized=True)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(replay, quant)), unit.name
        assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fp, quant))


def test_fp16_cache_and_inner_layer_targets(unet2d):
    unet, data = unet2d
    unit = next(u for u in reconstruction_units(unet, ReconstructionConfig(), data) if u.kind == "resnet")
    rows = torch.tensor([1, 3, 4, 8])
    cache = build_cache(
        unet, unit, data, rows, batch_size=3, cache_dtype="float16", quant_state=(True, True), with_inner=True
    )
    assert cache.targets[0].dtype == torch.float16 and set(cache.inner) == set(unit.inner_layers)
    full = build_cache(unet, unit, data, rows, batch_size=4, cache_dtype="float32", quant_state=(True, True))
    assert torch.allclose(cache.targets[0].float(), full.targets[0], rtol=2e-3, atol=2e-3)
    assert torch.equal(cache.timesteps, data.train_timesteps[rows])
    # Inner targets: each inner layer's float output inside the float block.
    set_quant_state(unet, weights=False, acts=False)
    seen = {}
    hooks = [
        unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
        for n in unit.inner_layers
    ]
    with torch.no_grad():
        unet(**data.unet_kwargs(rows))
    for h in hooks:
        h.remove()
    set_quant_state(unet, weights=True, acts=True)
    for name, target in cache.inner.items():
        assert torch.allclose(target.float(), seen[name], rtol=2e-3, atol=2e-3), name
