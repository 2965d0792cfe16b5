"""Spatial-temporal attention, capture and replay, and self-attention fusion.

The reference maps here are computed the naive way (a loop over frames,
explicit softmax), independently of the processors under test.
"""

from __future__ import annotations

import pytest
import torch

from fatezero_cli.attention import (
    AttentionBackend,
    FusedSelfAttnProcessor,
    FusionPlan,
    FusionStep,
    KeyFrames,
    SpatialTemporalAttnProcessor,
    VideoFrames,
    attention_layers,
    cross_attention_probs,
    self_attention_probs,
)
from fatezero_cli.config import InversionSettings
from fatezero_cli.errors import FatezeroError
from fatezero_cli.inversion import invert

# Key frames for 4 frames (middle frame (4-1)//2 = 1), worked by hand from DESIGN 3.3.
EXPECTED_KEY_FRAMES = {
    "self,mid": [[0, 1], [1], [2, 1], [3, 1]],
    "mid": [[1], [1], [1], [1]],
    "first,previous": [[0], [0], [0, 1], [0, 2]],
}


@pytest.mark.parametrize("spec", EXPECTED_KEY_FRAMES)
def test_key_frames_match_the_design(spec):
    key_frames = KeyFrames.parse(spec)
    assert [list(key_frames.frames_for(i, 4)) for i in range(4)] == EXPECTED_KEY_FRAMES[spec]


def test_key_frame_groups_cover_every_frame_once():
    groups = KeyFrames.parse("self,mid").groups(5)
    queries = sorted(int(q) for group in groups for q in group.queries)
    assert queries == [0, 1, 2, 3, 4]
    assert {group.keys.shape[1] for group in groups} == {1, 2}


@pytest.mark.parametrize("spec", ["", "self,middle", "next"])
def test_bad_key_frame_spec_is_a_clear_error(spec):
    with pytest.raises(FatezeroError, match="--key-frames"):
        KeyFrames.parse(spec)


def naive_self_maps(attn, hidden, key_lists):
    """softmax(Q_i [K_a; K_b]^T / sqrt(d)) per frame, heads split by hand."""
    heads = attn.heads
    query = attn.to_q(hidden)
    key = attn.to_k(hidden)
    maps = []
    for frame, keys in enumerate(key_lists):
        q = query[frame].reshape(query.shape[1], heads, -1).transpose(0, 1)
        k = torch.cat([key[i] for i in keys]).reshape(-1, heads, q.shape[-1]).transpose(0, 1)
        maps.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1))
    return maps


def naive_attention_output(attn, maps, value, key_lists):
    """Per frame: maps @ [V_a; V_b], heads merged, output projection."""
    outputs = []
    for frame_maps, keys in zip(maps, key_lists, strict=True):
        v = torch.cat([value[i] for i in keys]).unflatten(-1, (attn.heads, -1)).transpose(0, 1)
        outputs.append(attn.to_out[0]((frame_maps @ v).transpose(0, 1).flatten(1)))
    return torch.stack(outputs)


def naive_self_output(attn, hidden, key_lists):
    maps = naive_self_maps(attn, hidden, key_lists)
    return naive_attention_output(attn, maps, attn.to_v(hidden), key_lists)


class Probe:
    """Forward hooks that compute each self-attention map naively during inversion."""

    def __init__(self, unet, key_lists, layers):
        self.maps: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.cross: dict[tuple[str, int], torch.Tensor] = {}
        self.mismatch = 0.0
        self.timestep = None
        self.key_lists = key_lists
        self.handles = [
            unet.get_submodule(layer.name).register_forward_hook(self.hook(layer), with_kwargs=True)
            for layer in layers
        ]

    def hook(self, layer):
        def run(module, args, kwargs, output):
            hidden = args[0]
            if layer.kind == "self":
                self.maps[(layer.name, self.timestep)] = naive_self_maps(
                    module, hidden, self.key_lists
                )
                expected = naive_self_output(module, hidden, self.key_lists)
                self.mismatch = max(self.mismatch, float((expected - output).abs().max()))
            else:
                text = kwargs["encoder_hidden_states"]
                q = module.to_q(hidden).unflatten(-1, (module.heads, -1)).transpose(1, 2)
                k = module.to_k(text).unflatten(-1, (module.heads, -1)).transpose(1, 2)
                scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
                self.cross[(layer.name, self.timestep)] = scores.softmax(-1)

        return run

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("spec", EXPECTED_KEY_FRAMES)
def test_replayed_attention_equals_inversion_attention(tiny_bundle, small_clip, tmp_path, spec):
    """DESIGN 3.4: maps recomputed from the cache equal the inversion's (fp32, < 1e-5)."""
    unet = tiny_bundle.unet
    layers = [layer for layer in attention_layers(unet) if layer.fused_by_default]
    probe = Probe(unet, EXPECTED_KEY_FRAMES[spec], layers)
    timesteps = []

    def remember_timestep(module, args, kwargs):
        probe.timestep = int(args[1])
        timesteps.append(probe.timestep)

    handle = unet.register_forward_pre_hook(remember_timestep, with_kwargs=True)
    try:
        settings = InversionSettings("a black swan", steps=3, key_frames=spec, capture=1.0)
        result = invert(tiny_bundle, small_clip, settings, tmp_path)
    finally:
        handle.remove()
        probe.close()
    cache = result.cache
    assert probe.mismatch < 1e-5, "the processors' output differs from naive attention"
    assert set(cache.captured_timesteps) == set(timesteps)
    text = cache.source()["source_text"]
    key_frames = KeyFrames.parse(spec)
    worst = 0.0
    for timestep in timesteps:
        step = cache.step(timestep)
        for layer in layers:
            attn = unet.get_submodule(layer.name)
            if layer.kind == "self":
                replayed = self_attention_probs(attn, step[layer.name], key_frames)
                for got, want in zip(replayed, probe.maps[(layer.name, timestep)], strict=True):
                    worst = max(worst, float((got - want).abs().max()))
            else:
                replayed = cross_attention_probs(attn, step[layer.name], text)
                worst = max(
                    worst, float((replayed - probe.cross[(layer.name, timestep)]).abs().max())
                )
    assert worst < 1e-5


def test_a_frame_listed_twice_counts_once(tiny_bundle):
    """Under self,mid the middle frame's keys are its own tokens once, not twice."""
    attn = tiny_bundle.unet.get_submodule(attention_layers(tiny_bundle.unet)[0].name)
    hidden = torch.randn(3, 16, attn.to_q.in_features)
    maps = self_attention_probs(attn, hidden, KeyFrames.parse("self,mid"))
    assert [m.shape[-1] for m in maps] == [32, 16, 32]
    own = naive_self_maps(attn, hidden[1:2], [[0]])[0]
    torch.testing.assert_close(maps[1], own, rtol=0, atol=1e-6)
    out = SpatialTemporalAttnProcessor(VideoFrames(3, KeyFrames.parse("self,mid")))(attn, hidden)
    alone = SpatialTemporalAttnProcessor(VideoFrames(1, KeyFrames.parse("self")))(attn, hidden[1:2])
    torch.testing.assert_close(out[1:2], alone, rtol=0, atol=1e-6)


def fusion_setup(tiny_bundle, mask_value):
    unet = tiny_bundle.unet
    layer = next(
        layer for layer in attention_layers(unet) if layer.kind == "self" and layer.fused_by_default
    )
    attn = unet.get_submodule(layer.name)
    num_frames, tokens, width = 3, 16, attn.to_q.in_features
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * num_frames, tokens, width, generator=generator)
    source = torch.randn(num_frames, tokens, width, generator=generator)
    plan = FusionPlan(
        source_text=torch.zeros(1, 77, 32),
        mapping=None,
        fused_layers={layer.name},
        latent_hw=(4 * layer.downscale, 4 * layer.downscale),  # the layer's grid is 4x4
    )
    grid = layer.grid(plan.latent_hw)
    masks = None if mask_value is None else {grid: torch.full((num_frames, tokens), mask_value)}
    plan.step = FusionStep(source={layer.name: source}, self_replace=True, masks=masks)
    frames = VideoFrames(num_frames, KeyFrames.parse("self,mid"), AttentionBackend())
    fused = FusedSelfAttnProcessor(frames, plan, layer)(attn, hidden)
    plain = SpatialTemporalAttnProcessor(frames)(attn, hidden)
    return attn, hidden, source, fused, plain


def source_attention_with_edit_values(attn, hidden, source, key_lists):
    """Naive s_src @ V_edit for the cond half."""
    maps = naive_self_maps(attn, source, key_lists)
    return naive_attention_output(attn, maps, attn.to_v(hidden[source.shape[0] :]), key_lists)


def test_all_one_mask_gives_pure_edit_self_attention(tiny_bundle):
    _, _, _, fused, plain = fusion_setup(tiny_bundle, 1.0)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_value", [0.0, None])
def test_all_zero_mask_or_no_blend_words_gives_pure_source_self_attention(tiny_bundle, mask_value):
    attn, hidden, source, fused, plain = fusion_setup(tiny_bundle, mask_value)
    expected = source_attention_with_edit_values(attn, hidden, source, [[0, 1], [1], [2, 1]])
    torch.testing.assert_close(fused[3:], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused[:3], plain[:3], rtol=0, atol=1e-6)  # uncond stays plain
