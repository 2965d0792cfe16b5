"""DDIM denoising from a cache's z_T under an edit prompt, fusing the inversion's
attention at every step (DESIGN 3.2, 3.5-3.8).

Edit step k (0 = noisiest) evaluates the UNet at timestep t_k and reads the
inversion file recorded at the same t_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fatezero_cli.attention import (
    AttentionBackend,
    FusionPlan,
    FusionStep,
    KeyFrames,
    VideoFrames,
    attention_layers,
    fusion_processors,
)
from fatezero_cli.cache import Cache, StepPrefetcher
from fatezero_cli.config import LATENT_BLEND_WINDOW, EditSettings, window_steps
from fatezero_cli.errors import FatezeroError
from fatezero_cli.inversion import StepCallback, decode_latents
from fatezero_cli.masks import grid_map, threshold_masks, union, word_attention_map
from fatezero_cli.models import ModelBundle
from fatezero_cli.prompts import (
    blend_positions,
    encode_prompts,
    prompt_token_ids,
    reweight_vector,
    token_mapping,
    word_positions,
    word_window_vector,
    words,
)
from fatezero_cli.video import tensor_to_frames


@dataclass
class EditResult:
    frames: np.ndarray  # [F, H, W, 3] uint8
    latents: torch.Tensor  # [F, 4, h, w] the final latents, before the VAE
    masks: np.ndarray | None  # [F, h, w] float in [0, 1]: share of fused steps inside the mask


@dataclass(frozen=True)
class EditSchedule:
    """Which edit steps do what, as step counts from the noisiest step (DESIGN 3.5)."""

    steps: int
    self_steps: int
    token_steps: torch.Tensor  # [77] per-token cross window in steps
    latent_blend: tuple[int, int] | None

    @classmethod
    def build(cls, settings: EditSettings, steps: int, token_windows: torch.Tensor):
        blend = None
        if settings.latent_blend:
            blend = tuple(window_steps(f, steps) for f in LATENT_BLEND_WINDOW)
        return cls(
            steps=steps,
            self_steps=window_steps(settings.self_replace, steps),
            token_steps=torch.tensor([window_steps(float(f), steps) for f in token_windows]),
            latent_blend=blend,
        )

    def in_latent_blend(self, step: int) -> bool:
        return self.latent_blend is not None and self.latent_blend[0] <= step < self.latent_blend[1]

    def reads_source(self, step: int) -> bool:
        return (
            step < self.self_steps
            or step < int(self.token_steps.max())
            or self.in_latent_blend(step)
        )

    def source_indices(self) -> list[int]:
        """Steps whose inversion file is read: fused steps, and the step after a blended one."""
        needed = set()
        for step in range(self.steps):
            if self.reads_source(step):
                needed.add(step)
            if self.in_latent_blend(step) and step + 1 < self.steps:
                needed.add(step + 1)
        return sorted(needed)


def check_cache_covers(cache: Cache, schedule: EditSchedule, fused: set[str]) -> None:
    """An edit that needs steps or layers the cache did not keep fails up front (DESIGN 3.4)."""
    kept = len(cache.captured_timesteps)
    needed = max((k + 1 for k in range(schedule.steps) if schedule.reads_source(k)), default=0)
    if needed > kept:
        raise FatezeroError(
            f"this edit fuses the {needed} noisiest of {schedule.steps} steps but cache "
            f"{cache.key} kept only {kept}; lower the windows or invert again with "
            f"--capture {needed / schedule.steps:g} or more"
        )
    missing = fused - cache.captured_layers
    if missing:
        raise FatezeroError(
            f"cache {cache.key} did not keep {len(missing)} of the layers this edit fuses "
            "(--fuse-all-layers needs a cache inverted with --capture-all-layers)"
        )


def edit_word_positions(tokenizer, source: str, edit: str) -> list[int]:
    """The edit prompt's new words, whose own attention extends the latent-blend mask."""
    new_words = sorted(set(words(edit)) - set(words(source)))
    return sorted({p for word in new_words for p in word_positions(tokenizer, edit, word)})


class SourceSteps:
    """The inversion files an edit reads, prefetched in order, each loaded once."""

    def __init__(self, cache: Cache, timesteps: list[int], indices: list[int]) -> None:
        self.prefetcher = StepPrefetcher(cache, [timesteps[i] for i in indices])
        self.loaded: dict[int, dict[str, torch.Tensor]] = {}

    def at(self, timestep: int) -> dict[str, torch.Tensor]:
        if timestep not in self.loaded:
            self.loaded = {timestep: self.prefetcher.get(timestep), **self.loaded}
            for old in [t for t in self.loaded if t > timestep]:
                del self.loaded[old]
        return self.loaded[timestep]

    def close(self) -> None:
        self.prefetcher.close()


def check_edit_prompt(tokenizer, source_prompt: str, settings: EditSettings) -> None:
    """Fails on a prompt over 77 tokens or a word that is not where the options say."""
    prompt_token_ids(tokenizer, settings.prompt)
    blend_positions(tokenizer, source_prompt, list(settings.blend_words))
    reweight_vector(tokenizer, settings.prompt, settings.reweight)
    word_window_vector(
        tokenizer, settings.prompt, settings.cross_replace, settings.cross_replace_words
    )


@torch.no_grad()
def edit(
    bundle: ModelBundle,
    cache: Cache,
    settings: EditSettings,
    on_step: StepCallback | None = None,
    backend: AttentionBackend | None = None,
    want_masks: bool = False,
) -> EditResult:
    """One edit of a cached inversion; the cache is only read."""
    inputs = cache.manifest["inputs"]
    source_prompt = inputs["source_prompt"]
    steps = inputs["steps"]
    tokenizer = bundle.tokenizer
    check_edit_prompt(tokenizer, source_prompt, settings)
    mapping = token_mapping(tokenizer, source_prompt, settings.prompt)
    token_windows = word_window_vector(
        tokenizer, settings.prompt, settings.cross_replace, settings.cross_replace_words
    )
    reweight = reweight_vector(tokenizer, settings.prompt, settings.reweight)
    blend = blend_positions(tokenizer, source_prompt, list(settings.blend_words))
    schedule = EditSchedule.build(settings, steps, token_windows)
    layers = attention_layers(bundle.unet)
    fused = {layer.name for layer in layers if settings.fuse_all_layers or layer.fused_by_default}
    check_cache_covers(cache, schedule, fused)

    scheduler = bundle.ddim_scheduler()
    scheduler.set_timesteps(steps, device=bundle.device)
    timesteps = [int(t) for t in scheduler.timesteps]
    if sorted(timesteps) != cache.timesteps:
        raise FatezeroError(f"cache {cache.key} was inverted with other timesteps")
    source = cache.source()
    num_frames = int(source["z0"].shape[0])
    latent_hw = tuple(cache.manifest["latent_hw"])
    plan = FusionPlan(
        source_text=source["source_text"],
        mapping=mapping,
        fused_layers=fused,
        reweight=reweight if settings.reweight else None,
        latent_hw=latent_hw,
        edit_word_positions=edit_word_positions(tokenizer, source_prompt, settings.prompt),
        accumulate_edit_maps=settings.latent_blend,
    )
    frames = VideoFrames(
        num_frames,
        KeyFrames.parse(inputs["key_frames"]),
        backend or AttentionBackend(),
        inputs["key_frame_min_channels"],
    )
    bundle.unet.set_attn_processor(fusion_processors(bundle.unet, frames, plan))
    attentions = {layer.name: bundle.unet.get_submodule(layer.name) for layer in layers}
    mask_layers = [layer for layer in layers if layer.feeds_mask]
    mask_grids = sorted({layer.grid(latent_hw) for layer in layers if layer.name in fused})
    if settings.latent_blend or want_masks:
        mask_grids.append(latent_hw)
    text = encode_prompts(
        tokenizer, bundle.text_encoder, ["", settings.prompt], bundle.device, bundle.dtype
    )
    conditioning = torch.cat(
        [text[0:1].expand(num_frames, -1, -1), text[1:2].expand(num_frames, -1, -1)]
    )
    mask_sum = torch.zeros(num_frames, *latent_hw) if want_masks else None
    mask_count = 0

    source_steps = SourceSteps(cache, timesteps, schedule.source_indices())
    try:
        latent = source_steps.at(timesteps[0])["latent"].to(bundle.device, bundle.dtype)
        for step, timestep in enumerate(timesteps):
            data = source_steps.at(timestep) if schedule.reads_source(step) else {}
            masks = None
            if blend and (step < schedule.self_steps or schedule.in_latent_blend(step)):
                word_map = word_attention_map(
                    attentions, mask_layers, data, plan.source_text, blend, latent_hw
                )
                masks = threshold_masks(word_map, mask_grids, settings.tau)
                if mask_sum is not None:
                    mask_sum += masks[latent_hw].reshape(num_frames, *latent_hw).cpu()
                    mask_count += 1
            open_tokens = (step < schedule.token_steps).float()
            plan.step = FusionStep(
                source=data,
                self_replace=step < schedule.self_steps,
                cross_window=open_tokens if bool(open_tokens.any()) else None,
                masks=masks,
            )
            noise = bundle.unet(
                torch.cat([latent, latent]), timestep, encoder_hidden_states=conditioning
            ).sample
            uncond, cond = noise.chunk(2)
            noise = uncond + settings.guidance * (cond - uncond)
            latent = scheduler.step(noise, timestep, latent).prev_sample
            if schedule.in_latent_blend(step) and step + 1 < len(timesteps):
                latent = blend_latents(
                    latent,
                    source_steps.at(timesteps[step + 1])["latent"],
                    masks,
                    plan,
                    mask_layers,
                    latent_hw,
                    settings.tau,
                )
            if on_step:
                on_step(step + 1, len(timesteps))
    finally:
        source_steps.close()
        plan.step = FusionStep()
    pixels = decode_latents(bundle, latent)
    masks_out = None
    if mask_sum is not None and mask_count:
        masks_out = (mask_sum / mask_count).numpy()
    return EditResult(tensor_to_frames(pixels), latent.cpu(), masks_out)


def blend_latents(
    latent: torch.Tensor,
    source_latent: torch.Tensor,
    masks: dict | None,
    plan: FusionPlan,
    mask_layers: list,
    latent_hw: tuple[int, int],
    tau: float,
) -> torch.Tensor:
    """z = z_src + M' (z - z_src), M' = source mask | edit-words mask (DESIGN 3.8)."""
    num_frames = latent.shape[0]
    if masks:
        mask = masks[latent_hw].to(latent.device)
    else:
        mask = torch.zeros(num_frames, latent_hw[0] * latent_hw[1], device=latent.device)
    if plan.edit_word_positions and plan.edit_maps:
        accumulated = torch.stack([plan.edit_maps[layer.name] for layer in mask_layers]).mean(0)
        edit_map = grid_map(accumulated.float().to(latent.device), mask_layers[0].grid(latent_hw))
        mask = union(mask, threshold_masks(edit_map, [latent_hw], tau)[latent_hw])
    mask = mask.reshape(num_frames, 1, *latent_hw).to(latent.device, latent.dtype)
    source_latent = source_latent.to(latent.device, latent.dtype)
    return source_latent + mask * (latent - source_latent)
