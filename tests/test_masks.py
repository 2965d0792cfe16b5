"""The blending mask steps of DESIGN 3.6, against hand-worked expectations."""

from __future__ import annotations

import torch

from fatezero_cli.attention import FusionPlan, attention_layers, cross_attention_probs
from fatezero_cli.editing import blend_latents
from fatezero_cli.masks import threshold_masks, word_attention_map


def test_dilation_resize_normalisation_threshold_by_hand():
    word_map = torch.zeros(2, 1, 4, 4)
    word_map[0, 0, 0, 0] = 2.0  # frame 0: one peak in the corner
    word_map[0, 0, 3, 3] = 0.5  # a weaker one: 0.25 of the peak after normalising
    word_map[1, 0, 2, 1] = 0.1  # frame 1: a faint peak still normalises to 1
    masks = threshold_masks(word_map, [(4, 4), (2, 2), (8, 8)], tau=0.3)
    expected_4 = torch.zeros(2, 4, 4)
    expected_4[0, :2, :2] = 1  # 3x3 dilation of the corner peak, clipped at the border
    expected_4[1, 1:4, 0:3] = 1  # dilation around (2, 1)
    torch.testing.assert_close(masks[(4, 4)], expected_4.flatten(1))
    # nearest downsampling to 2x2 reads source pixels (0,0), (0,2), (2,0), (2,2)
    expected_2 = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 1]])
    torch.testing.assert_close(masks[(2, 2)], expected_2)
    # nearest upsampling repeats each cell 2x2
    up = expected_4.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1)
    torch.testing.assert_close(masks[(8, 8)], up)


def test_word_attention_map_sums_words_and_averages_heads_and_layers(tiny_bundle):
    unet = tiny_bundle.unet
    layers = [layer for layer in attention_layers(unet) if layer.feeds_mask]
    assert len(layers) == 5  # like SD 1.x: two down and three up layers at 1/4 resolution
    latent_hw = (16, 16)
    generator = torch.Generator().manual_seed(1)
    source = {
        layer.name: torch.randn(
            2, 16, unet.get_submodule(layer.name).to_q.in_features, generator=generator
        )
        for layer in layers
    }
    text = torch.randn(1, 77, 32, generator=generator)
    attentions = {layer.name: unet.get_submodule(layer.name) for layer in layers}
    got = word_attention_map(attentions, layers, source, text, [2, 3], latent_hw)
    per_layer = []
    for layer in layers:
        probs = cross_attention_probs(attentions[layer.name], source[layer.name], text)
        per_layer.append((probs[..., 2] + probs[..., 3]).mean(dim=1))
    expected = torch.stack(per_layer).mean(0).reshape(2, 1, 4, 4)
    torch.testing.assert_close(got, expected)


def test_latent_blend_keeps_the_source_outside_the_mask():
    latent = torch.randn(2, 4, 4, 4)
    source = torch.randn(2, 4, 4, 4)
    plan = FusionPlan(
        source_text=torch.zeros(1, 77, 8), mapping=None, fused_layers=set(), latent_hw=(4, 4)
    )
    mask = torch.zeros(2, 16)
    mask[0, :8] = 1
    out = blend_latents(latent, source, {(4, 4): mask}, plan, [], (4, 4), 0.3)
    torch.testing.assert_close(out[0, :, :2], latent[0, :, :2])
    torch.testing.assert_close(out[0, :, 2:], source[0, :, 2:])
    torch.testing.assert_close(out[1], source[1])
