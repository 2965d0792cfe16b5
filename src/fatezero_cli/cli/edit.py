"""`fatezero edit`: edit a cached inversion, as many times as you like."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fatezero_cli.cli import options as opt
from fatezero_cli.cli.common import (
    cache_root,
    from_options,
    output_paths,
    parse_blend,
    print_json,
    say,
    step_progress,
)
from fatezero_cli.errors import FatezeroError

EXAMPLE = """
Example:

  fatezero edit 3f2a9c --edit "a white duck" --blend "black swan"
  fatezero edit 3f2a9c --edit "a pink flamingo" --edit "a crystal swan" -o edits/

CACHE is a cache directory, a key, or a unique key prefix (`fatezero cache list`).
"""


@dataclass(frozen=True)
class EditOptions:
    """The edit options of `edit` and `run`, as the user gave them."""

    edit: list[str] | None
    guidance: float
    cross_replace: float
    cross_replace_word: list[str] | None
    self_replace: float
    blend: str | None
    tau: float
    reweight: list[str] | None
    latent_blend: bool
    fuse_all_layers: bool

    def settings(self):
        """One EditSettings per prompt; bad values fail before any model is loaded."""
        from fatezero_cli.config import EditSettings
        from fatezero_cli.prompts import parse_word_values

        if not self.edit:
            raise FatezeroError("give at least one --edit prompt")
        per_word = parse_word_values(self.cross_replace_word or [], "--cross-replace-word")
        reweight = parse_word_values(self.reweight or [], "--reweight")
        return [
            EditSettings(
                prompt=prompt,
                guidance=self.guidance,
                cross_replace=self.cross_replace,
                cross_replace_words=per_word,
                self_replace=self.self_replace,
                blend_words=parse_blend(self.blend),
                tau=self.tau,
                reweight=reweight,
                latent_blend=self.latent_blend,
                fuse_all_layers=self.fuse_all_layers,
            )
            for prompt in self.edit
        ]


@dataclass(frozen=True)
class OutputOptions:
    output: Path | None
    side_by_side: bool
    save_masks: bool
    overwrite: bool
    seed: int


def check_prompts(bundle, source_prompt: str, all_settings) -> None:
    """Every word and length problem of every edit, before the first one starts."""
    from fatezero_cli.editing import check_edit_prompt

    for settings in all_settings:
        check_edit_prompt(bundle.tokenizer, source_prompt, settings)


def edit_cache(
    bundle, cache, all_settings, outputs: OutputOptions, attention: str, quiet: bool
) -> list[dict]:
    """Run every edit of one cache and write its outputs; shared by `edit` and `run`."""
    from fatezero_cli.attention import AttentionBackend
    from fatezero_cli.editing import edit

    check_same_model(bundle, cache)
    check_prompts(bundle, cache.manifest["inputs"]["source_prompt"], all_settings)
    backend = AttentionBackend.choose(attention, bundle.device)
    video_name = Path(cache.manifest["video"]["source"]).stem
    paths = output_paths(
        outputs.output, video_name, [s.prompt for s in all_settings], outputs.overwrite
    )
    written = []
    for settings, path in zip(all_settings, paths, strict=True):
        with step_progress(f"edit: {settings.prompt[:40]}", quiet) as on_step:
            result = edit(
                bundle,
                cache,
                settings,
                on_step=on_step,
                backend=backend,
                want_masks=outputs.save_masks,
            )
        written.append(write_outputs(bundle, cache, settings, result, path, outputs))
        say(f"wrote {written[-1]['output']}", quiet)
    return written


def write_outputs(bundle, cache, settings, result, path: Path, outputs: OutputOptions) -> dict:
    """The edited video, its settings record, and optionally the masks."""
    from fatezero_cli import __version__
    from fatezero_cli.video import side_by_side, write_video

    video = cache.manifest["video"]
    fps = video["fps"]
    source_frames = cache.source()["frames"].numpy()
    frames = result.frames
    if outputs.side_by_side:
        frames = side_by_side(source_frames, frames, settings.prompt)
    write_video(frames, path, fps, overwrite=outputs.overwrite)
    record = {
        "output": str(path),
        "tool": f"fatezero-cli {__version__}",
        "cache": cache.key,
        "model": cache.manifest["model"],
        "inversion": {k: v for k, v in cache.manifest["inputs"].items() if k != "model"},
        "video": video,
        "edit": settings.to_dict(),
        "seed": outputs.seed,
        "device": str(bundle.device),
        "dtype": str(bundle.dtype).removeprefix("torch."),
    }
    masks_path = None
    if outputs.save_masks and result.masks is not None:
        masks_path = path.with_name(f"{path.stem}-masks{path.suffix}")
        write_video(mask_overlay(source_frames, result.masks), masks_path, fps, outputs.overwrite)
        record["masks"] = str(masks_path)
    settings_path = path.with_name(path.name + ".json")
    settings_path.write_text(json.dumps(record, indent=2) + "\n")
    return {
        "output": str(path),
        "settings": str(settings_path),
        "masks": masks_path and str(masks_path),
        "prompt": settings.prompt,
        "edit": record["edit"],
    }


def mask_overlay(frames, masks):
    """The source frames with the blend mask tinted red: what the edit may touch."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    height, width = frames.shape[1:3]
    scaled = F.interpolate(torch.from_numpy(masks)[:, None], size=(height, width), mode="nearest")
    alpha = scaled[:, 0, :, :, None].numpy() * 0.6
    red = np.array([255, 0, 0], dtype=np.float32)
    return (frames * (1 - alpha) + red * alpha).round().astype(np.uint8)


def open_cache(reference: str, cache_dir: Path | None):
    from fatezero_cli.cache import Cache, resolve_cache

    return Cache.open(resolve_cache(reference, cache_root(cache_dir)))


def model_for_cache(cache, model: str | None, model_config: Path | None) -> tuple:
    """The model to load: the cache's own unless the user names one (checked after loading)."""
    if model is not None:
        return model, model_config
    recorded = cache.manifest["model"]
    config = recorded.get("config")
    return recorded["name"], Path(config) if config else model_config


def check_same_model(bundle, cache) -> None:
    """Attention captured with other weights would be fused silently wrong (DESIGN 4)."""
    from fatezero_cli.inversion import model_key

    recorded = cache.manifest["model"]
    if model_key(bundle.identity) != model_key(recorded):
        raise FatezeroError(
            f"cache {cache.key} was inverted with model {recorded['name']} "
            f"({model_key(recorded)}), not with these weights ({model_key(bundle.identity)}); "
            "edit with that model or invert again"
        )


def edit_command(
    cache: opt.CacheRef,
    edit: opt.EditPrompts = None,
    model: opt.OptionalModel = None,
    model_config: opt.ModelConfig = None,
    guidance: opt.Guidance = 7.5,
    cross_replace: opt.CrossReplace = 0.8,
    cross_replace_word: opt.CrossReplaceWord = None,
    self_replace: opt.SelfReplace = 0.6,
    blend: opt.Blend = None,
    tau: opt.Tau = 0.3,
    reweight: opt.Reweight = None,
    latent_blend: opt.LatentBlend = False,
    fuse_all_layers: opt.FuseAllLayers = False,
    output: opt.Output = None,
    side_by_side: opt.SideBySide = False,
    save_masks: opt.SaveMasks = False,
    overwrite: opt.Overwrite = False,
    cache_dir: opt.CacheDir = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    attention: opt.AttentionKernel = "auto",
    seed: opt.Seed = 0,
    quiet: opt.Quiet = False,
    json_: opt.Json = False,
) -> None:
    """Edit a cached inversion under a new prompt, fusing the source attention.

    Writes one video per --edit prompt (default: ./outputs/<video>-<prompt>.mp4,
    never overwriting), each with a .json of the settings that made it.
    """
    from fatezero_cli.cli.invert import load_bundle

    all_settings = from_options(EditOptions, locals()).settings()
    root = cache_root(cache_dir)
    opened = open_cache(cache, cache_dir)
    model_path, config = model_for_cache(opened, model, model_config)
    bundle = load_bundle(model_path, config, device, dtype, root, quiet)
    written = edit_cache(
        bundle,
        opened,
        all_settings,
        from_options(OutputOptions, locals()),
        attention,
        quiet,
    )
    if json_:
        print_json({"cache": opened.key, "outputs": written})
    else:
        for entry in written:
            print(entry["output"])
