"""DDIM inversion that records attention inputs into the cache (DESIGN 3.2-3.4, 4).

Inversion step i evaluates the UNet at timestep t_i (ascending) and writes
`steps/t{t_i}.safetensors`; the edit step that evaluates the UNet at the same
t reads that file. Steps are keyed by UNet timestep, never by loop index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fatezero_cli.attention import (
    AttentionBackend,
    KeyFrames,
    StepRecorder,
    VideoFrames,
    attention_layers,
    capture_processors,
)
from fatezero_cli.cache import (
    MANIFEST,
    Cache,
    CacheWriter,
    cache_lock,
    content_key,
    step_file,
    tensor_digest,
)
from fatezero_cli.config import InversionSettings
from fatezero_cli.models import ModelBundle
from fatezero_cli.prompts import encode_prompts
from fatezero_cli.video import Clip, frames_to_tensor

VAE_CHUNK = 4
SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "clip_sample",
    "set_alpha_to_one",
    "rescale_betas_zero_snr",
)

StepCallback = Callable[[int, int], None]


@dataclass
class InversionResult:
    cache: Cache
    hit: bool

    def summary(self) -> dict:
        manifest = self.cache.manifest
        return {
            "cache": str(self.cache.path),
            "key": self.cache.key,
            "hit": self.hit,
            "frames": manifest["video"]["frames"],
            "steps": manifest["inputs"]["steps"],
            "bytes": manifest["bytes"],
        }


def model_key(identity: dict) -> dict:
    """The parts of a model's identity that change its outputs (not where it lies on disk)."""
    return {k: v for k, v in identity.items() if k not in ("name", "config")}


def cache_inputs(bundle: ModelBundle, clip: Clip, settings: InversionSettings) -> dict:
    """Everything the content address covers (DESIGN 4)."""
    return {
        "frames": {
            "sha256": tensor_digest(torch.from_numpy(clip.frames)),
            "shape": list(clip.frames.shape),
        },
        "model": model_key(bundle.identity),
        "scheduler": {k: bundle.scheduler_config.get(k) for k in SCHEDULER_KEYS},
        "steps": settings.steps,
        "source_prompt": settings.source_prompt,
        "key_frames": KeyFrames.parse(settings.key_frames).spec,
        "key_frame_min_channels": settings.key_frame_min_channels,
        "capture_steps": settings.captured_steps(),
        "capture_layers": "all" if settings.capture_all_layers else "fused",
        "dtype": str(bundle.dtype).removeprefix("torch."),
    }


@torch.no_grad()
def encode_frames(bundle: ModelBundle, frames: torch.Tensor) -> torch.Tensor:
    """z0 = posterior mean x scaling factor, in frame chunks (DESIGN 3.2, 5)."""
    latents = []
    for chunk in frames.split(VAE_CHUNK):
        chunk = chunk.to(device=bundle.device, dtype=bundle.vae.dtype)
        posterior = bundle.vae.encode(chunk).latent_dist
        latents.append(posterior.mean * bundle.vae.config.scaling_factor)
    return torch.cat(latents).to(bundle.dtype)


@torch.no_grad()
def decode_latents(bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1], in frame chunks so VAE memory does not grow with F."""
    frames = []
    for chunk in latents.split(VAE_CHUNK):
        chunk = chunk.to(device=bundle.device, dtype=bundle.vae.dtype)
        frames.append(bundle.vae.decode(chunk / bundle.vae.config.scaling_factor).sample.float())
    return torch.cat(frames).cpu()


def captured_layer_names(unet: torch.nn.Module, all_layers: bool) -> list[str]:
    return [layer.name for layer in attention_layers(unet) if all_layers or layer.fused_by_default]


def captured_timesteps(timesteps: list[int], settings: InversionSettings) -> list[int]:
    """The noisiest floor(capture * N) timesteps: the edit's first steps, where fusion runs."""
    count = settings.captured_steps()
    return sorted(timesteps)[len(timesteps) - count :] if count else []


def invert(
    bundle: ModelBundle,
    clip: Clip,
    settings: InversionSettings,
    cache_root: Path,
    on_step: StepCallback | None = None,
    backend: AttentionBackend | None = None,
) -> InversionResult:
    """Invert `clip` into a cache under `cache_root`, or return the existing one."""
    inputs = cache_inputs(bundle, clip, settings)
    key = content_key(inputs)
    with cache_lock(cache_root, key):
        existing = find_complete_cache(cache_root / key)
        if existing is not None:
            return InversionResult(existing, hit=True)
        writer = CacheWriter(cache_root, key)
        writer.start_clean()
        try:
            manifest = run_inversion(bundle, clip, settings, inputs, writer, on_step, backend)
        except BaseException:
            writer.abandon()
            raise
        return InversionResult(Cache(writer.path, manifest), hit=False)


def find_complete_cache(path: Path) -> Cache | None:
    """A complete cache at `path`, or None when there is none or only an interrupted one."""
    if not (path / MANIFEST).is_file():
        return None
    return Cache.open(path)


@torch.no_grad()
def run_inversion(
    bundle: ModelBundle,
    clip: Clip,
    settings: InversionSettings,
    inputs: dict,
    writer: CacheWriter,
    on_step: StepCallback | None,
    backend: AttentionBackend | None,
) -> dict:
    num_frames = len(clip.frames)
    text = encode_prompts(
        bundle.tokenizer, bundle.text_encoder, [settings.source_prompt], bundle.device, bundle.dtype
    )
    z0 = encode_frames(bundle, frames_to_tensor(clip.frames))
    writer.write(
        "source.safetensors",
        {"frames": torch.from_numpy(clip.frames), "z0": z0, "source_text": text},
    )
    scheduler = bundle.ddim_inverse_scheduler()
    scheduler.set_timesteps(settings.steps, device=bundle.device)
    timesteps = [int(t) for t in scheduler.timesteps]
    capture_at = set(captured_timesteps(timesteps, settings))
    layers = captured_layer_names(bundle.unet, settings.capture_all_layers)
    recorder = StepRecorder()
    frames = VideoFrames(
        num_frames,
        KeyFrames.parse(settings.key_frames),
        backend or AttentionBackend(),
        settings.key_frame_min_channels,
    )
    bundle.unet.set_attn_processor(capture_processors(bundle.unet, frames, set(layers), recorder))
    conditioning = text.expand(num_frames, -1, -1)
    latent = z0
    for index, timestep in enumerate(timesteps):
        recorder.start(timestep in capture_at)
        noise = bundle.unet(latent, timestep, encoder_hidden_states=conditioning).sample
        latent = scheduler.step(noise, timestep, latent).prev_sample
        writer.write_behind(step_file(timestep), {"latent": latent, **recorder.tensors})
        recorder.start(False)
        if on_step:
            on_step(index + 1, len(timesteps))
    return writer.finish(
        {
            "inputs": inputs,
            "model": bundle.identity,
            "video": {
                "source": str(clip.source),
                "fps": clip.fps,
                "frames": num_frames,
                "height": int(clip.frames.shape[1]),
                "width": int(clip.frames.shape[2]),
            },
            "latent_hw": list(z0.shape[-2:]),
            "timesteps": timesteps,
            "captured_timesteps": sorted(capture_at),
            "captured_layers": layers,
        }
    )
