"""The blending mask: where the edit may change the video (DESIGN 3.6, 3.8).

The mask comes from the inversion's cross-attention of the source words to be
edited, so it marks where the *source* object is, per frame and per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fatezero_cli.attention import AttentionLayer, cross_attention_probs


def word_attention_map(
    attentions: dict[str, torch.nn.Module],
    mask_layers: list[AttentionLayer],
    source: dict[str, torch.Tensor],
    source_text: torch.Tensor,
    positions: list[int],
    latent_hw: tuple[int, int],
) -> torch.Tensor:
    """Steps 1-2: the words' summed probabilities, averaged over heads and layers: [F, 1, h, w]."""
    per_layer = []
    for layer in mask_layers:
        hidden = source[layer.name]
        attn = attentions[layer.name]
        hidden = hidden.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
        text = source_text.to(device=hidden.device, dtype=hidden.dtype)
        probs = cross_attention_probs(attn, hidden, text)  # [F, heads, N, 77]
        per_layer.append(probs[..., positions].sum(dim=-1).mean(dim=1))  # [F, N]
    return grid_map(torch.stack(per_layer).mean(dim=0), mask_layers[0].grid(latent_hw))


def grid_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[F, N] -> [F, 1, h, w]."""
    return tokens.reshape(tokens.shape[0], 1, *grid)


def threshold_masks(
    word_map: torch.Tensor, grids: list[tuple[int, int]], tau: float
) -> dict[tuple[int, int], torch.Tensor]:
    """Steps 3-4: dilate 3x3, resize (nearest) to each grid, divide by each frame's max, > tau.

    Returns, per grid, a float mask [F, h*w] of zeros and ones.
    """
    dilated = F.max_pool2d(word_map.float(), kernel_size=3, stride=1, padding=1)
    masks = {}
    for grid in grids:
        resized = F.interpolate(dilated, size=grid, mode="nearest")
        peak = resized.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        masks[grid] = (resized / peak > tau).float().flatten(1)
    return masks


def union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.maximum(a, b)
