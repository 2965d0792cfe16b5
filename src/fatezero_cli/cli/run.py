"""`fatezero run`: invert (or reuse a matching cache) and edit, in one call."""

from __future__ import annotations

from fatezero_cli.cli import options as opt
from fatezero_cli.cli.common import from_options, print_json
from fatezero_cli.cli.edit import EditOptions, OutputOptions, check_prompts, edit_cache
from fatezero_cli.cli.invert import InvertRequest, invert_video

EXAMPLE = """
Example:

  fatezero run swan.mp4 --src "a black swan" --edit "a white duck" --blend "black swan"

The inversion is cached: editing the same video again skips it.
"""


def run_command(
    video: opt.VideoArg,
    src: opt.SourcePrompt,
    edit: opt.EditPrompts = None,
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
    """Invert VIDEO (or reuse its cache) and edit it under each --edit prompt.

    --capture is raised to what the edits need, and --fuse-all-layers turns on
    --capture-all-layers, so one call always has what it fuses.
    """
    all_settings = from_options(EditOptions, locals()).settings()
    request = from_options(
        InvertRequest,
        locals(),
        capture=max([capture, *(s.needed_capture() for s in all_settings)]),
        capture_all_layers=capture_all_layers or fuse_all_layers,
    )
    bundle, inverted = invert_video(
        request, check_before=lambda bundle: check_prompts(bundle, src, all_settings)
    )
    written = edit_cache(
        bundle,
        inverted.cache,
        all_settings,
        from_options(OutputOptions, locals()),
        attention,
        quiet,
    )
    if json_:
        print_json({"inversion": inverted.summary(), "outputs": written})
    else:
        for entry in written:
            print(entry["output"])
