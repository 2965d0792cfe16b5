"""Video in and out: decoding, frame selection, resizing, encoding.

Everything the diffusion side sees passes through here as `[F, H, W, 3]` uint8 RGB
arrays, so the rest of the tool never deals with containers, codecs or pixel formats.
Mistakes a user can fix (bad paths, unreadable files, impossible selections) surface
as one-line `FatezeroError`s.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from fatezero_cli.errors import FatezeroError
from fatezero_cli.files import private_dir_as_ordinary, replace_atomically

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
VIDEO_KINDS = {".mp4": "mp4", ".mov": "mov", ".webm": "webm", ".gif": "gif"}
CROP_MODES = ("none", "square")
SIZE_MULTIPLE = 64  # latents must survive the UNet's three downsamplings (DESIGN 3.1)
FRAME_NAME = re.compile(r"\d{5}\.png")

FrameLoader = Callable[[], np.ndarray]


@dataclass(frozen=True)
class FrameSelection:
    """Which source frames to edit: start, start + stride, ... (`count` None = to the end)."""

    start: int = 0
    count: int | None = 8
    stride: int = 1

    def __post_init__(self) -> None:
        # Checked here so a bad CLI option fails before any file is opened.
        if self.start < 0:
            raise FatezeroError(f"--start must be 0 or more, got {self.start}")
        if self.count is not None and self.count < 1:
            raise FatezeroError(f"--frames must be 1 or more (or 'all'), got {self.count}")
        if self.stride < 1:
            raise FatezeroError(f"--stride must be 1 or more, got {self.stride}")

    def describe(self) -> str:
        """The selection spelled as the CLI options, so error messages say what to change."""
        frames = "all" if self.count is None else self.count
        return f"--start {self.start} --frames {frames} --stride {self.stride}"

    def wants(self, index: int) -> bool:
        return index >= self.start and (index - self.start) % self.stride == 0

    @property
    def frames_needed(self) -> int:
        """Source frames that must exist: the index of the last selected frame, plus one."""
        count = 1 if self.count is None else self.count
        return self.start + (count - 1) * self.stride + 1


def parse_frame_count(text: str) -> int | None:
    """Read `--frames`: a positive number, or `all` (None) for every frame from --start."""
    cleaned = text.strip().lower()
    if cleaned == "all":
        return None
    try:
        count = int(cleaned)
    except ValueError:
        raise FatezeroError(f"--frames must be a positive number or 'all', got {text!r}") from None
    if count < 1:
        raise FatezeroError(f"--frames must be a positive number or 'all', got {text!r}")
    return count


@dataclass
class Clip:
    """Selected, resized frames plus what is needed to write the edit back at the same pace."""

    frames: np.ndarray
    fps: float
    source: Path
    source_size: tuple[int, int]


def read_clip(
    path: Path,
    selection: FrameSelection = FrameSelection(),
    size: int = 512,
    crop: str = "none",
    default_fps: float = 10.0,
) -> Clip:
    """Decode only the frames the selection reaches, resizing each as it arrives.

    Resizing per frame keeps memory at the output size even for `--frames all` on a long,
    large video.
    """
    path = Path(path)
    _check_crop(crop)
    if path.is_dir():
        loaders = (partial(_load_image, image) for image in _list_images(path))
        frames, source_size = _take_selected(loaders, selection, path, size, crop)
        return Clip(frames, default_fps / selection.stride, path, source_size)
    if not path.exists():
        raise FatezeroError(f"{path}: no such file or folder")
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"  # frame + slice threads: decoding is the slow part
            fps = _stream_fps(stream, default_fps)
            loaders = (
                partial(frame.to_ndarray, format="rgb24") for frame in container.decode(stream)
            )
            frames, source_size = _take_selected(loaders, selection, path, size, crop)
    except (av.error.FFmpegError, OSError) as error:
        raise FatezeroError(f"{path}: not a readable video ({_first_line(error)})") from None
    return Clip(frames, fps / selection.stride, path, source_size)


def _list_images(folder: Path) -> list[Path]:
    """Image files sorted by name; sizes are checked up front (headers only, cheap)."""
    images = sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise FatezeroError(f"{folder}: folder has no .png/.jpg images")
    first_size = _image_size(images[0])
    for image in images[1:]:
        if _image_size(image) != first_size:
            raise FatezeroError(
                f"{folder}: images differ in size: {image.name} is {_wxh(_image_size(image))}, "
                f"{images[0].name} is {_wxh(first_size)}"
            )
    return images


def _image_size(path: Path) -> tuple[int, int]:
    """Size as displayed: phone photos store rotation in EXIF, which `_load_image` applies."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            rotated = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    except (UnidentifiedImageError, OSError) as error:
        raise FatezeroError(f"{path}: not a readable image ({_first_line(error)})") from None
    return (height, width) if rotated else (width, height)


def _load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise FatezeroError(f"{path}: not a readable image ({_first_line(error)})") from None


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.VideoStream:
    if not container.streams.video:
        raise FatezeroError(f"{path}: has no video stream")
    return container.streams.video[0]


def _stream_fps(stream: av.video.VideoStream, default_fps: float) -> float:
    """Containers disagree on which rate they fill in; take the first plausible one.

    Variable-rate files can report a timebase such as 90000 as their rate, hence the bound.
    """
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < rate < 1000:
            return float(rate)
    return default_fps


def _take_selected(
    loaders: Iterator[FrameLoader],
    selection: FrameSelection,
    path: Path,
    size: int,
    crop: str,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Walk the source once, converting only selected frames and stopping at the last one."""
    frames: list[np.ndarray] = []
    source_size: tuple[int, int] | None = None
    target: tuple[int, int] | None = None
    seen = 0
    for index, load in enumerate(loaders):
        seen = index + 1
        if not selection.wants(index):
            continue
        image = load()
        if source_size is None:
            source_size = (image.shape[1], image.shape[0])
            target = target_size(*source_size, size, crop)
        frames.append(_fit_frame(image, target))
        if len(frames) == selection.count:
            break
    if seen == 0:
        raise FatezeroError(f"{path}: has no frames")
    if not frames or (selection.count is not None and len(frames) < selection.count):
        raise FatezeroError(
            f"{path}: has {seen} frames; {selection.describe()} needs "
            f"{'at least ' if selection.count is None else ''}{selection.frames_needed}"
        )
    return np.stack(frames), source_size


def target_size(width: int, height: int, size: int, crop: str = "none") -> tuple[int, int]:
    """Output (W, H): `size` on the short side, the long side keeping the aspect ratio.

    Both sides snap to multiples of 64, so the aspect ratio is kept as closely as the
    grid allows and `_fit_frame` crops the few pixels of difference.
    """
    _check_crop(crop)
    if size < 1:
        raise FatezeroError(f"--size must be positive, got {size}")
    short = _round_to_multiple(size)
    if crop == "square" or width == height:
        return short, short
    long = _round_to_multiple(max(width, height) * short / min(width, height))
    return (long, short) if width > height else (short, long)


def _round_to_multiple(value: float) -> int:
    # floor(x + 0.5) rather than round(): banker's rounding would make ties go either way.
    return max(SIZE_MULTIPLE, math.floor(value / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


def _check_crop(crop: str) -> None:
    if crop not in CROP_MODES:
        raise FatezeroError(f"--crop must be one of {', '.join(CROP_MODES)}, got {crop!r}")


def resize_frames(frames: np.ndarray, size: int, crop: str = "none") -> np.ndarray:
    """Resize a whole clip; a clip already at its target size comes back untouched."""
    height, width = frames.shape[1:3]
    target = target_size(width, height, size, crop)
    if (width, height) == target:
        return frames
    return np.stack([_fit_frame(frame, target) for frame in frames])


def _fit_frame(frame: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Scale to cover `target` and centre-crop, in one resampling pass.

    Cropping the source box that maps onto the target (instead of resizing, then cropping)
    avoids rounding the intermediate size, so pixels stay square. Frames already at the
    target size are returned as they are, bit for bit.
    """
    height, width = frame.shape[:2]
    target_width, target_height = target
    if (width, height) == target:
        return frame
    scale = max(target_width / width, target_height / height)
    box_width, box_height = target_width / scale, target_height / scale
    left, top = (width - box_width) / 2, (height - box_height) / 2
    box = (left, top, left + box_width, top + box_height)
    resized = Image.fromarray(frame).resize(target, Image.Resampling.LANCZOS, box=box)
    return np.asarray(resized)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 `[F, H, W, 3]` to the VAE's input range: float32 `[F, 3, H, W]` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """The inverse of `frames_to_tensor`, clamping what the VAE decodes out of range."""
    scaled = ((x.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def output_kind(path: Path) -> str:
    """What to write, judged by the path alone: a video format or a folder of PNG frames."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        return "frames"
    kind = VIDEO_KINDS.get(path.suffix.lower())
    if kind is None:
        supported = ", ".join(VIDEO_KINDS)
        raise FatezeroError(
            f"{path}: unsupported output type {path.suffix!r}; "
            f"use {supported} or a folder (no suffix) for PNG frames"
        )
    return kind


def write_video(frames: np.ndarray, path: Path, fps: float, overwrite: bool = False) -> Path:
    """Write `frames` to `path` in the format its suffix names, never clobbering by accident.

    Files are encoded under a temporary name in the same folder and renamed into place, so an
    interrupted run leaves either the old output or the new one, never half a video.
    """
    path = Path(path)
    kind = output_kind(path)
    _check_frames(frames)
    if not (math.isfinite(fps) and fps > 0):
        raise FatezeroError(f"fps must be a positive number, got {fps}")
    if kind == "frames" and path.is_file():
        raise FatezeroError(f"{path}: is a file, so a folder of frames cannot be written there")
    refuse_to_clobber(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "frames":
        _write_frame_folder(frames, path)
    else:
        replace_atomically(path, partial(_WRITERS[kind], frames, fps=fps))
    return path


def _check_frames(frames: np.ndarray) -> None:
    # A programming error, not a user one: callers always pass decoded or generated frames.
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or not len(frames):
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")


def refuse_to_clobber(path: Path, overwrite: bool) -> None:
    """Outputs never overwrite silently; also called before an edit starts, to fail early."""
    occupied = any(path.iterdir()) if path.is_dir() else path.exists()
    if occupied and not overwrite:
        raise FatezeroError(f"{path}: already exists; pass --overwrite or choose another -o")


def _write_frame_folder(frames: np.ndarray, path: Path) -> None:
    """PNG frames written beside the target, then moved in, so readers never see a partial set.

    When overwriting, only earlier numbered frames are removed: other files a user keeps in
    that folder are none of our business.
    """
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    private_dir_as_ordinary(temp)
    try:
        for index, frame in enumerate(frames):
            Image.fromarray(frame).save(temp / f"{index:05d}.png")
        if not path.exists():
            temp.rename(path)
            return
        for stale in path.iterdir():
            if FRAME_NAME.fullmatch(stale.name):
                stale.unlink()
        for written in sorted(temp.iterdir()):
            os.replace(written, path / written.name)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _encode_h264(frames: np.ndarray, path: Path, fps: float) -> None:
    # faststart puts the index first, so browsers start playing before the download ends.
    options = {"crf": "18", "preset": "medium"}
    _encode_with_pyav(frames, path, fps, "libx264", options, {"movflags": "+faststart"})


def _encode_vp9(frames: np.ndarray, path: Path, fps: float) -> None:
    # VP9 is in constant-quality mode only when the bitrate is 0.
    options = {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
    _encode_with_pyav(frames, path, fps, "libvpx-vp9", options, {})


def _encode_with_pyav(
    frames: np.ndarray,
    path: Path,
    fps: float,
    codec: str,
    options: dict[str, str],
    container_options: dict[str, str],
) -> None:
    """Encode as yuv420p, the pixel format every player decodes, at a rational frame rate.

    A float rate like 23.976 becomes a fraction so timestamps do not drift.
    """
    frames = _even_sized(frames)
    rate = Fraction(fps).limit_denominator(10_000)
    with av.open(str(path), mode="w", options=container_options) as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _even_sized(frames: np.ndarray) -> np.ndarray:
    """yuv420p halves the chroma resolution, so odd sizes get one repeated edge pixel."""
    height, width = frames.shape[1:3]
    if height % 2 == 0 and width % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _encode_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    """One shared palette for all frames avoids the colour flicker of per-frame palettes.

    Browsers play frames shorter than 20 ms at 100 ms, so faster clips are slowed to 50 fps.
    Pillow merges identical consecutive frames into one longer frame; playback is the same.
    """
    palette = _shared_palette(frames)
    images = [
        Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
        for frame in frames
    ]
    duration = max(20, round(1000 / fps))
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0
    )


def _shared_palette(frames: np.ndarray, sample_frames: int = 16) -> Image.Image:
    """A 256-colour palette from evenly spaced frames, enough to see every scene's colours."""
    picks = np.linspace(0, len(frames) - 1, min(sample_frames, len(frames))).round().astype(int)
    mosaic = Image.fromarray(np.concatenate(frames[picks], axis=0))
    return mosaic.quantize(colors=256, method=Image.Quantize.MEDIANCUT)


_WRITERS: dict[str, Callable[..., None]] = {
    "mp4": _encode_h264,
    "mov": _encode_h264,
    "webm": _encode_vp9,
    "gif": _encode_gif,
}


def side_by_side(left: np.ndarray, right: np.ndarray, caption: str | None = None) -> np.ndarray:
    """Source and edit next to each other, for comparing at a glance; sizes stay even for H.264."""
    if len(left) != len(right):
        raise FatezeroError(f"cannot compare clips of {len(left)} and {len(right)} frames")
    height = left.shape[1]
    if right.shape[1] != height:
        width = max(1, round(right.shape[2] * height / right.shape[1]))
        right = np.stack([_resize_exact(frame, (width, height)) for frame in right])
    combined = np.concatenate([left, right], axis=2)
    if caption:
        strip = _caption_strip(caption, combined.shape[2], height)
        strip = np.broadcast_to(strip, (len(combined), *strip.shape))
        combined = np.concatenate([combined, strip], axis=1)
    return _even_sized(combined)


def _resize_exact(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS))


def _caption_strip(caption: str, width: int, frame_height: int) -> np.ndarray:
    """White text centred on black, scaled with the frame and shrunk until it fits the width."""
    font_size = max(10, round(frame_height * 0.05))
    font = ImageFont.load_default(size=font_size)
    text_width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(caption, font=font)
    if text_width > 0.96 * width:
        font_size = max(8, math.floor(font_size * 0.96 * width / text_width))
        font = ImageFont.load_default(size=font_size)
    strip_height = round(font_size * 1.8)
    strip = Image.new("RGB", (width, strip_height), "black")
    draw = ImageDraw.Draw(strip)
    draw.text((width / 2, strip_height / 2), caption, fill="white", font=font, anchor="mm")
    return np.asarray(strip)


def unique_path(path: Path) -> Path:
    """`path` if nothing is there yet, else the first free `name-1.ext`, `name-2.ext`, ..."""
    path = Path(path)
    if not path.exists():
        return path
    index = 1
    while True:
        candidate = path.with_name(f"{path.stem}-{index}{path.suffix}")
        if not candidate.exists():
            return candidate
        index += 1


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _first_line(error: Exception) -> str:
    """FFmpeg and OS errors carry a plain reason in `strerror`; their str() adds errno noise."""
    reason = getattr(error, "strerror", None) or str(error).strip() or type(error).__name__
    return reason.splitlines()[0]
