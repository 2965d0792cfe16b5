"""Options shared by several commands, declared once (scripts rely on these names)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

VideoArg = Annotated[
    Path,
    typer.Argument(
        metavar="VIDEO", help="A video file (mp4, mov, mkv, webm, avi, gif) or a folder of frames."
    ),
]
SourcePrompt = Annotated[
    str, typer.Option("--src", help="Prompt describing the source video, e.g. 'a black swan'.")
]
Model = Annotated[
    str,
    typer.Option(
        "--model",
        help="Hub id, local diffusers folder, or a .safetensors/.ckpt checkpoint.",
    ),
]
CacheRef = Annotated[
    str,
    typer.Argument(
        metavar="CACHE", help="A cache directory, key, or unique key prefix (fatezero cache list)."
    ),
]
ModelConfig = Annotated[
    Path | None,
    typer.Option(
        "--model-config",
        help="For a single-file --model: a local diffusers folder with its configs and tokenizer "
        "(so loading needs no network).",
    ),
]
OptionalModel = Annotated[
    str | None,
    typer.Option("--model", help="Model to edit with; default: the one the cache was made with."),
]
Size = Annotated[
    int, typer.Option("--size", help="Short side in pixels, rounded to a multiple of 64.")
]
Crop = Annotated[
    str, typer.Option("--crop", help="'none' keeps the aspect ratio; 'square' centre-crops.")
]
Frames = Annotated[str, typer.Option("--frames", help="Number of frames to edit, or 'all'.")]
Stride = Annotated[int, typer.Option("--stride", min=1, help="Take every k-th frame.")]
Start = Annotated[int, typer.Option("--start", min=0, help="Index of the first frame.")]
Steps = Annotated[int, typer.Option("--steps", min=1, help="DDIM steps (inversion and edit).")]
KeyFramesOpt = Annotated[
    str,
    typer.Option(
        "--key-frames",
        help="Frames each frame's self-attention reads: self,mid | mid | first,previous.",
    ),
]
KeyFrameMinChannels = Annotated[
    int,
    typer.Option(
        "--key-frame-min-channels",
        min=0,
        help="Only layers with at least this many channels read other frames (0: all layers).",
    ),
]
Capture = Annotated[
    float,
    typer.Option(
        "--capture",
        help="Fraction of the noisiest steps whose attention is kept; edits can fuse up to it.",
    ),
]
CaptureAllLayers = Annotated[
    bool,
    typer.Option(
        "--capture-all-layers",
        help="Also keep the largest layers (needed by --fuse-all-layers; about 2x disk).",
    ),
]
CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        envvar="FATEZERO_CACHE",
        help="Where inversions are cached.",
        show_default="$FATEZERO_CACHE or the user cache dir",
    ),
]
Device = Annotated[
    str | None,
    typer.Option("--device", help="cuda, cuda:1, cpu...", show_default="cuda if available"),
]
Dtype = Annotated[
    str | None,
    typer.Option("--dtype", help="fp16 or fp32.", show_default="fp16 on CUDA, fp32 on CPU"),
]
AttentionKernel = Annotated[
    str, typer.Option("--attention", help="Attention kernel: auto, sdpa or xformers.")
]
Seed = Annotated[
    int,
    typer.Option("--seed", help="Random seed, recorded with every output (DDIM itself is exact)."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Output = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Output file (.mp4 .mov .webm .gif) or folder of PNG frames; with several "
        "--edit prompts, a folder that receives one video per edit.",
    ),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace outputs that already exist.")]

EditPrompts = Annotated[
    list[str],
    typer.Option("--edit", help="Edit prompt; repeat for several edits of one inversion."),
]
Guidance = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")]
CrossReplace = Annotated[
    float,
    typer.Option(
        "--cross-replace",
        help="Fraction of steps whose word attention comes from the source (layout).",
    ),
]
CrossReplaceWord = Annotated[
    list[str] | None,
    typer.Option(
        "--cross-replace-word",
        help="WORD=FRACTION: a cross-replace window for one edit-prompt word; repeatable.",
    ),
]
SelfReplace = Annotated[
    float,
    typer.Option(
        "--self-replace",
        help="Fraction of steps whose self-attention comes from the source (structure, motion).",
    ),
]
Blend = Annotated[
    str | None,
    typer.Option(
        "--blend",
        help="Source-prompt words to edit, space separated; outside them the source is kept.",
    ),
]
Tau = Annotated[float, typer.Option("--tau", help="Blend mask threshold (0-1).")]
Reweight = Annotated[
    list[str] | None,
    typer.Option("--reweight", help="WORD=FACTOR: strengthen an edit-prompt word; repeatable."),
]
LatentBlend = Annotated[
    bool,
    typer.Option("--latent-blend", help="Also blend latents with the source outside the mask."),
]
FuseAllLayers = Annotated[
    bool, typer.Option("--fuse-all-layers", help="Fuse the largest layers too.")
]
SideBySide = Annotated[
    bool, typer.Option("--side-by-side", help="Write source | edit side by side, captioned.")
]
SaveMasks = Annotated[
    bool, typer.Option("--save-masks", help="Also write the blend masks over the frames.")
]
