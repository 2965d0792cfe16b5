"""`fatezero invert`: invert a video once into a reusable cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fatezero_cli.cli import options as opt
from fatezero_cli.cli.common import (
    cache_root,
    from_options,
    print_json,
    say,
    silence_libraries,
    step_progress,
)
from fatezero_cli.errors import FatezeroError

EXAMPLE = """
Example:

  fatezero invert swan.mp4 --src "a black swan"

prints the cache directory; then edit it as often as you like:

  fatezero edit <cache> --edit "a white duck" --blend "black swan"
"""


def read_video(video: Path, size: int, crop: str, frames: str, stride: int, start: int):
    from fatezero_cli.video import FrameSelection, parse_frame_count, read_clip

    selection = FrameSelection(start=start, count=parse_frame_count(frames), stride=stride)
    return read_clip(video, selection, size=size, crop=crop)


def load_bundle(
    model: str,
    model_config: Path | None,
    device: str | None,
    dtype: str | None,
    root: Path,
    quiet: bool,
):
    from fatezero_cli.models import load_model

    silence_libraries()
    say(f"loading model {model}", quiet)
    return load_model(model, device=device, dtype=dtype, cache_root=root, config=model_config)


@dataclass(frozen=True)
class InvertRequest:
    """The inversion options of `invert` and `run`, as the user gave them."""

    video: Path
    src: str
    model: str
    model_config: Path | None
    size: int
    crop: str
    frames: str
    stride: int
    start: int
    steps: int
    key_frames: str
    key_frame_min_channels: int
    capture: float
    capture_all_layers: bool
    cache_dir: Path | None
    device: str | None
    dtype: str | None
    attention: str
    quiet: bool

    def settings(self):
        from fatezero_cli.attention import KeyFrames
        from fatezero_cli.config import InversionSettings

        if not self.src.strip():
            raise FatezeroError("--src must describe the source video")
        KeyFrames.parse(self.key_frames)
        return InversionSettings(
            source_prompt=self.src,
            steps=self.steps,
            key_frames=self.key_frames,
            key_frame_min_channels=self.key_frame_min_channels,
            capture=self.capture,
            capture_all_layers=self.capture_all_layers,
        )


def invert_video(request: InvertRequest, check_before: Callable | None = None):
    """Shared by `invert` and `run`: returns (bundle, InversionResult).

    `check_before(bundle)` runs once the model is loaded and before inverting,
    so `run` reports a bad edit prompt without first spending the inversion.
    """
    from fatezero_cli.attention import AttentionBackend
    from fatezero_cli.inversion import invert
    from fatezero_cli.prompts import prompt_token_ids

    settings = request.settings()
    clip = read_video(
        request.video, request.size, request.crop, request.frames, request.stride, request.start
    )
    root = cache_root(request.cache_dir)
    bundle = load_bundle(
        request.model, request.model_config, request.device, request.dtype, root, request.quiet
    )
    prompt_token_ids(bundle.tokenizer, request.src)
    if check_before is not None:
        check_before(bundle)
    backend = AttentionBackend.choose(request.attention, bundle.device)
    height, width = clip.frames.shape[1:3]
    say(
        f"inverting {len(clip.frames)} frames at {width}x{height}, {request.steps} steps",
        request.quiet,
    )
    with step_progress("invert", request.quiet) as on_step:
        result = invert(bundle, clip, settings, root, on_step=on_step, backend=backend)
    if result.hit:
        say("cache hit: nothing to recompute", request.quiet)
    return bundle, result


def invert_command(
    video: opt.VideoArg,
    src: opt.SourcePrompt,
    model: opt.Model = "CompVis/stable-diffusion-v1-4",
    model_config: opt.ModelConfig = None,
    size: opt.Size = 512,
    crop: opt.Crop = "none",
    frames: opt.Frames = "8",
    stride: opt.Stride = 1,
    start: opt.Start = 0,
    steps: opt.Steps = 50,
    key_frames: opt.KeyFramesOpt = "self,mid",
    key_frame_min_channels: opt.KeyFrameMinChannels = 0,
    capture: opt.Capture = 0.8,
    capture_all_layers: opt.CaptureAllLayers = False,
    cache_dir: opt.CacheDir = None,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    attention: opt.AttentionKernel = "auto",
    seed: opt.Seed = 0,
    quiet: opt.Quiet = False,
    json_: opt.Json = False,
) -> None:
    """Invert VIDEO under the source prompt and cache its attention for later edits.

    Prints the cache directory (or, with --json, an object with cache, key,
    hit, frames, steps, bytes). The same inputs again are a cache hit.
    """
    _, result = invert_video(from_options(InvertRequest, locals()))
    if json_:
        print_json(result.summary())
    else:
        print(result.cache.path)
