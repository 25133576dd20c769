"""Reversible weight patches against the fast paths: a patched U-Net with pre-packed convolutions and fused
q/k/v projections computes what a model built with the merged weights computes, and after restore what it
computed before, bit for bit; bad patches are refused before anything changes."""

import copy

import pytest
import torch

from latentdiff import speedups
from latentdiff.config import UNetConfig
from latentdiff.errors import InputError, LatentDiffError
from latentdiff.patches import apply_patches
from latentdiff.unet import UNet

CFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=2,
                 context_dim=16)
CONV = "input_blocks.1.0.in_layers.2.weight"  # a 3x3 conv: pre-packed
Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # q, k: fused with their v
K = "middle_block.1.transformer_blocks.0.attn1.to_k.weight"
CROSS_V = "output_blocks.0.1.transformer_blocks.0.attn2.to_v.weight"  # reads the context: not fused
BIAS = "out.2.bias"


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def inputs():
    return randn(2, 4, 8, 8, seed=1), torch.tensor([500.0, 20.5]), randn(2, 5, 16, seed=2)


def fast(model: UNet) -> UNet:
    assert speedups.prepack_convolutions(model, True) > 0 and speedups.fuse_projections(model, True) > 0
    return model


def run(model):
    with torch.no_grad():
        return model(*inputs())


def patch_set(model):
    params = dict(model.named_parameters())
    return {CONV: randn(*params[CONV].shape, seed=3) * 0.1, Q: randn(*params[Q].shape, seed=4) * 0.2,
            K: randn(*params[K].shape, seed=5) * 0.2, CROSS_V: lambda w: w * 0.5, BIAS: torch.full((4,), 0.25)}


def merged_state(model, patches):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, patch in patches.items():
        state[name] = patch(state[name]) if callable(patch) else state[name] + patch
    return state


def test_patches_reach_packed_and_fused_copies_and_restore_bit_for_bit():
    torch.manual_seed(0)
    plain = UNet(CFG).eval()
    model = fast(copy.deepcopy(plain))
    before, state_before = run(model), {k: v.clone() for k, v in model.state_dict().items()}  # caches built
    patches = patch_set(model)
    merged = copy.deepcopy(plain)
    merged.load_state_dict(merged_state(plain, patches))
    fast_merged = fast(copy.deepcopy(merged))

    handle = apply_patches(model, patches)
    patched = run(model)
    assert torch.equal(patched, run(fast_merged))  # the same fast paths over the merged weights
    # eager against packed fp32 convolutions may differ in the last bit (speedups.PackedConv2d)
    assert (patched - run(merged)).abs().max() <= 1e-5
    assert (patched - before).abs().max() > 0.01  # the patches changed the output
    handle.restore()
    assert torch.equal(run(model), before)
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    with pytest.raises(LatentDiffError, match="already restored"):
        handle.restore()


def test_context_manager_and_stacked_patches():
    torch.manual_seed(0)
    model = fast(UNet(CFG).eval())
    before = run(model)
    with apply_patches(model, {BIAS: torch.full((4,), 1.0)}):
        once = run(model)
        with apply_patches(model, {BIAS: torch.full((4,), 1.0)}) as inner:
            assert inner.names == [BIAS]
            assert torch.allclose(run(model), once + 1.0, atol=1e-6)  # the output conv's bias adds directly
        assert torch.equal(run(model), once)
    assert torch.equal(run(model), before)


def test_delta_on_low_precision_weights_is_rounded_once():
    torch.manual_seed(0)
    model = UNet(CFG).to(torch.bfloat16)
    w = model.get_parameter(CONV).detach().clone()
    delta = randn(*w.shape, seed=6) * 1e-3
    with apply_patches(model, {CONV: delta}):
        assert torch.equal(model.get_parameter(CONV), (w.float() + delta).bfloat16())
    assert torch.equal(model.get_parameter(CONV), w)


def test_bad_patches_are_refused_before_anything_changes():
    torch.manual_seed(0)
    model = UNet(CFG)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    good = torch.ones_like(model.get_parameter(BIAS))
    with pytest.raises(InputError, match=r"no such parameter; did you mean 'out\.2\.bias'"):
        apply_patches(model, {BIAS: good, "out.2.bais": good})
    with pytest.raises(InputError, match=r"the delta has shape \(3,\), the parameter \(32,\)"):
        apply_patches(model, {BIAS: good, "out.0.bias": torch.ones(3)})
    with pytest.raises(InputError, match="not finite"):
        apply_patches(model, {BIAS: good, CONV: lambda w: w * float("nan")})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.inference_mode():
        frozen = UNet(CFG)
    with pytest.raises(LatentDiffError, match="inference tensor"):
        apply_patches(frozen, {BIAS: good})
