"""`fatezero tune`: one-shot Tune-A-Video tuning for shape edits (DESIGN 3.9)."""

from __future__ import annotations

from fatezero_cli.cli import options as opt
from fatezero_cli.errors import NotBuiltYet

EXAMPLE = """
Example:

  fatezero tune swan.mp4 --src "a black swan"

Not available yet in this version: the command exits with code 2.
"""


def tune_command(
    video: opt.VideoArg,
    src: opt.SourcePrompt,
    model: opt.Model = "CompVis/stable-diffusion-v1-4",
    size: opt.Size = 512,
    frames: opt.Frames = "8",
    stride: opt.Stride = 1,
    start: opt.Start = 0,
    device: opt.Device = None,
    dtype: opt.Dtype = None,
    seed: opt.Seed = 0,
    quiet: opt.Quiet = False,
    json_: opt.Json = False,
    output: opt.Output = None,
) -> None:
    """Tune the model on VIDEO for shape edits (Tune-A-Video); not built yet."""
    raise NotBuiltYet("fatezero tune is not available in this version yet (Tune-A-Video tuning)")
