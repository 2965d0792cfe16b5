"""Video in and out: real clips from ../shared/data plus small synthetic clips."""

from __future__ import annotations

import re
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from fatezero_cli.errors import FatezeroError
from fatezero_cli.video import (
    Clip,
    FrameSelection,
    frames_to_tensor,
    output_kind,
    parse_frame_count,
    read_clip,
    resize_frames,
    side_by_side,
    target_size,
    tensor_to_frames,
    unique_path,
    write_video,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ALL = FrameSelection(count=None)


def shared_data(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"real clip {path} not found (the ../shared/data folder is absent)")
    return path


def decode_all_rgb(path: Path) -> np.ndarray:
    """Reference decode with PyAV directly, independent of the code under test."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def smooth_clip(frames: int = 12, height: int = 128, width: int = 192) -> np.ndarray:
    """Soft moving colour waves: easy for codecs, so round-trip errors measure bugs, not codecs."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    clip = []
    for t in range(frames):
        phase = t * 0.3
        red = 128 + 100 * np.sin(x / 23 + phase)
        green = 128 + 100 * np.cos(y / 19 - phase)
        blue = 128 + 80 * np.sin((x + y) / 31 + 2 * phase)
        clip.append(np.stack([red, green, blue], axis=-1))
    return np.clip(np.stack(clip), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def rabbit_all_small() -> Clip:
    return read_clip(shared_data("clips/rabbit-watermelon.mp4"), ALL, size=64)


# --- decoding real clips ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fps", "source_size"),
    [
        ("black-swan", 24.0, (512, 512)),
        ("car-turn", 10.0, (480, 480)),
        ("brown-bear", 24.0, (512, 512)),
        ("rabbit-watermelon", 30.0, (718, 718)),
    ],
)
def test_default_read_gives_eight_512_frames(name, fps, source_size):
    clip = read_clip(shared_data(f"clips/{name}.mp4"))
    assert clip.frames.shape == (8, 512, 512, 3)
    assert clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(fps)
    assert clip.source_size == source_size
    assert clip.source.name == f"{name}.mp4"


def test_all_frames_of_a_long_clip(rabbit_all_small):
    assert rabbit_all_small.frames.shape == (186, 64, 64, 3)
    assert rabbit_all_small.fps == pytest.approx(30.0)


def test_stride_selection_picks_the_right_frames_and_divides_fps(rabbit_all_small):
    path = shared_data("clips/rabbit-watermelon.mp4")
    clip = read_clip(path, FrameSelection(start=5, count=6, stride=2), size=64)
    assert clip.fps == pytest.approx(15.0)
    np.testing.assert_array_equal(clip.frames, rabbit_all_small.frames[5:17:2])


def test_all_from_start_with_stride(rabbit_all_small):
    path = shared_data("clips/rabbit-watermelon.mp4")
    clip = read_clip(path, FrameSelection(start=100, count=None, stride=3), size=64)
    np.testing.assert_array_equal(clip.frames, rabbit_all_small.frames[100::3])


def test_short_clip_all_frames():
    clip = read_clip(shared_data("clips/brown-bear.mp4"), ALL)
    assert clip.frames.shape == (11, 512, 512, 3)


def test_frames_at_target_size_are_bit_identical_to_the_source():
    path = shared_data("clips/black-swan.mp4")
    clip = read_clip(path, FrameSelection(start=3, count=4, stride=5), size=512)
    np.testing.assert_array_equal(clip.frames, decode_all_rgb(path)[3:19:5])


def test_480_clip_is_resized_up_to_512():
    path = shared_data("clips/car-turn.mp4")
    clip = read_clip(path, FrameSelection(count=2))
    source = decode_all_rgb(path)[:2]
    assert clip.frames.shape == (2, 512, 512, 3)
    upscaled = np.asarray(Image.fromarray(source[0]).resize((512, 512), Image.Resampling.LANCZOS))
    assert np.abs(clip.frames[0].astype(int) - upscaled).mean() < 1


def test_decodes_only_as_far_as_needed(tmp_path):
    # car-turn keeps its index up front, so a cut-off copy still starts; asking for the first
    # frames must not touch the broken tail.
    truncated = tmp_path / "half.mp4"
    truncated.write_bytes(shared_data("clips/car-turn.mp4").read_bytes()[:300_000])
    assert read_clip(truncated, size=64).frames.shape == (8, 64, 64, 3)


def test_frame_folder():
    folder = shared_data("teaser_car-turn")
    clip = read_clip(folder, FrameSelection(start=1, count=3, stride=2))
    expected = [np.asarray(Image.open(folder / f"0000{i}.png").convert("RGB")) for i in (1, 3, 5)]
    np.testing.assert_array_equal(clip.frames, np.stack(expected))
    assert clip.fps == pytest.approx(5.0)
    assert clip.source_size == (512, 512)


def test_frame_folder_default_fps_and_all():
    clip = read_clip(shared_data("teaser_car-turn"), ALL, size=64, default_fps=8.0)
    assert clip.frames.shape == (8, 64, 64, 3)
    assert clip.fps == pytest.approx(8.0)


def test_folder_sorts_by_name_any_case_and_ignores_other_files(tmp_path):
    frames = smooth_clip(frames=3, height=64, width=64)
    for name, frame in zip(["b.PNG", "a.png", "c.Png"], frames, strict=True):
        Image.fromarray(frame).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub.png").mkdir()
    clip = read_clip(tmp_path, ALL, size=64)
    np.testing.assert_array_equal(clip.frames, frames[[1, 0, 2]])


def test_gif_input(tmp_path):
    frames = smooth_clip(frames=5, height=64, width=64)
    path = tmp_path / "in.gif"
    Image.fromarray(frames[0]).save(
        path,
        save_all=True,
        append_images=[Image.fromarray(f) for f in frames[1:]],
        duration=100,
        loop=0,
    )
    clip = read_clip(path, ALL, size=64)
    assert clip.frames.shape == (5, 64, 64, 3)
    assert clip.fps == pytest.approx(10.0)


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "size", "crop", "expected"),
    [
        (1280, 720, 512, "none", (896, 512)),
        (720, 1280, 512, "none", (512, 896)),
        (1920, 1080, 512, "none", (896, 512)),
        (480, 480, 512, "none", (512, 512)),
        (718, 718, 500, "none", (512, 512)),
        (640, 480, 448, "none", (576, 448)),
        (1280, 720, 512, "square", (512, 512)),
        (720, 1280, 300, "square", (320, 320)),
        (100, 50, 10, "none", (128, 64)),
        (5000, 100, 64, "none", (3200, 64)),
    ],
)
def test_target_size(width, height, size, crop, expected):
    assert target_size(width, height, size, crop) == expected


def test_target_size_rejects_bad_crop_and_size():
    with pytest.raises(FatezeroError, match="--crop"):
        target_size(64, 64, 64, "circle")
    with pytest.raises(FatezeroError, match="--size"):
        target_size(64, 64, 0)


def test_resize_keeps_aspect_and_crops_the_centre():
    # A 16:9 frame: red bands at both ends, middle green, a centred white disc.
    frames = np.zeros((2, 90, 160, 3), np.uint8)
    frames[:, :, :30] = frames[:, :, 130:] = (255, 0, 0)
    frames[:, :, 30:130] = (0, 255, 0)
    y, x = np.mgrid[0:90, 0:160]
    frames[:, (y - 45) ** 2 + (x - 80) ** 2 < 20**2] = 255

    wide = resize_frames(frames, 64)
    assert wide.shape == (2, 64, 128, 3)
    disc = wide[0].min(axis=2) > 200
    rows, cols = np.nonzero(disc)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1  # still round

    square = resize_frames(frames, 64, crop="square")
    assert square.shape == (2, 64, 64, 3)
    assert (square[0, :, :2, 0] < 30).all()  # the red bands are cropped away


def test_resize_returns_frames_at_target_size_untouched():
    frames = smooth_clip(frames=2, height=64, width=128)
    assert resize_frames(frames, 64) is frames


# --- tensors ------------------------------------------------------------------------------


def test_tensor_round_trip_is_exact():
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 16, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (3, 3, 8, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert frames_to_tensor(np.array([[[[0, 255, 0]]]], np.uint8)).flatten().tolist() == [
        -1,
        1,
        -1,
    ]
    np.testing.assert_array_equal(tensor_to_frames(x), frames)


def test_tensor_to_frames_clamps_out_of_range():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert tensor_to_frames(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


# --- writing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [("a.mp4", "mp4"), ("a.MOV", "mov"), ("a.webm", "webm"), ("a.gif", "gif"), ("out", "frames")],
)
def test_output_kind(name, kind):
    assert output_kind(Path(name)) == kind


def test_output_kind_existing_folder_with_dot(tmp_path):
    folder = tmp_path / "edit.v2"
    folder.mkdir()
    assert output_kind(folder) == "frames"


def test_unknown_suffix_lists_supported_ones(tmp_path):
    with pytest.raises(FatezeroError, match=r"\.avi.*\.mp4.*\.gif"):
        write_video(smooth_clip(frames=1), tmp_path / "x.avi", 10)


@pytest.mark.parametrize(("suffix", "max_error"), [(".mp4", 6), (".mov", 6), (".webm", 6)])
def test_video_round_trip(tmp_path, suffix, max_error):
    frames = smooth_clip()
    path = write_video(frames, tmp_path / "sub" / f"out{suffix}", fps=23.976)
    assert path == tmp_path / "sub" / f"out{suffix}"
    clip = read_clip(path, ALL, size=128)
    assert clip.frames.shape == frames.shape
    assert clip.fps == pytest.approx(23.976, abs=1e-3)
    assert np.abs(clip.frames.astype(int) - frames).mean() < max_error
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_mp4_is_h264_yuv420p_at_an_exact_rate(tmp_path):
    path = write_video(smooth_clip(frames=4), tmp_path / "out.mp4", fps=24000 / 1001)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.format.name == "yuv420p"
        assert stream.average_rate == Fraction(24000, 1001)


def test_odd_sizes_are_padded_for_yuv420p(tmp_path):
    frames = smooth_clip(frames=3, height=63, width=65)
    path = write_video(frames, tmp_path / "odd.mp4", fps=10)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (66, 64)


def test_gif_round_trip(tmp_path):
    frames = smooth_clip()
    path = write_video(frames, tmp_path / "out.gif", fps=10)
    with Image.open(path) as gif:
        assert gif.info["loop"] == 0
        assert gif.info["duration"] == 100
    clip = read_clip(path, ALL, size=128)
    assert clip.frames.shape == frames.shape
    assert clip.fps == pytest.approx(10.0)
    assert np.abs(clip.frames.astype(int) - frames).mean() < 12


def test_png_folder_round_trip_is_lossless(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    path = write_video(frames, tmp_path / "frames", fps=10)
    assert sorted(p.name for p in path.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    np.testing.assert_array_equal(read_clip(path, ALL, size=64).frames, frames)
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]


def test_png_folder_into_an_existing_empty_folder(tmp_path):
    folder = tmp_path / "out.d"
    folder.mkdir()
    write_video(smooth_clip(frames=2, height=64, width=64), folder, fps=10)
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png"]


def test_refuses_to_overwrite_a_file(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"precious")
    with pytest.raises(FatezeroError, match=r"out\.mp4.*exists.*--overwrite"):
        write_video(smooth_clip(frames=2), path, fps=10)
    assert path.read_bytes() == b"precious"
    write_video(smooth_clip(frames=2), path, fps=10, overwrite=True)
    assert read_clip(path, ALL, size=128).frames.shape[0] == 2


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    folder = tmp_path / "frames"
    write_video(smooth_clip(frames=3, height=64, width=64), folder, fps=10)
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(FatezeroError, match="exists"):
        write_video(smooth_clip(frames=2, height=64, width=64), folder, fps=10)
    write_video(smooth_clip(frames=2, height=64, width=64), folder, fps=10, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "keep.txt"]


def test_rejects_bad_fps(tmp_path):
    with pytest.raises(FatezeroError, match="fps"):
        write_video(smooth_clip(frames=1), tmp_path / "a.mp4", fps=0)


def test_unique_path(tmp_path):
    path = tmp_path / "edit.mp4"
    assert unique_path(path) == path
    path.touch()
    assert unique_path(path) == tmp_path / "edit-1.mp4"
    (tmp_path / "edit-1.mp4").touch()
    assert unique_path(path) == tmp_path / "edit-2.mp4"
    (tmp_path / "frames").mkdir()
    assert unique_path(tmp_path / "frames") == tmp_path / "frames-1"


# --- side by side -------------------------------------------------------------------------


def test_side_by_side_concatenates_frames():
    left, right = smooth_clip(frames=2, height=64, width=64), smooth_clip(frames=2, height=64)
    both = side_by_side(left, right)
    assert both.shape == (2, 64, 256, 3)
    np.testing.assert_array_equal(both[:, :, :64], left)
    np.testing.assert_array_equal(both[:, :, 64:], right)


def test_side_by_side_matches_heights_and_adds_an_even_caption_strip():
    left = smooth_clip(frames=2, height=64, width=63)
    right = smooth_clip(frames=2, height=128, width=128)
    both = side_by_side(left, right, caption="a silver jeep -> a Porsche car")
    assert both.shape[0] == 2
    assert both.shape[1] > 64 and both.shape[1] % 2 == 0
    assert both.shape[2] == 128  # 63 + 64 (right scaled to height 64), padded to even
    strip = both[0, 64:]
    assert strip.max() > 200 and strip.min() < 20  # white text on black


def test_side_by_side_rejects_different_lengths():
    with pytest.raises(FatezeroError, match="frames"):
        side_by_side(smooth_clip(frames=2), smooth_clip(frames=3))


# --- user errors --------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FatezeroError, match=r"nope\.mp4"):
        read_clip(tmp_path / "nope.mp4")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.mp4"
    path.write_bytes(shared_data("clips/black-swan.mp4").read_bytes()[:2048])
    with pytest.raises(FatezeroError, match=r"cut\.mp4"):
        read_clip(path)


def test_truncated_file_with_its_index_up_front(tmp_path):
    path = tmp_path / "cut.mp4"
    path.write_bytes(shared_data("clips/car-turn.mp4").read_bytes()[:2048])
    with pytest.raises(FatezeroError, match=r"cut\.mp4"):
        read_clip(path)


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n")
    with pytest.raises(FatezeroError, match=r"notes\.mp4.*not a readable video"):
        read_clip(path)


def test_empty_folder(tmp_path):
    with pytest.raises(FatezeroError, match=re.escape(str(tmp_path))):
        read_clip(tmp_path)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FatezeroError, match=r"no \.png/\.jpg images"):
        read_clip(tmp_path)


def test_folder_with_different_image_sizes(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "0.png")
    Image.new("RGB", (64, 32)).save(tmp_path / "1.png")
    with pytest.raises(FatezeroError, match=r"differ in size.*1\.png is 64x32"):
        read_clip(tmp_path)


def test_unreadable_image_in_folder(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "0.png")
    (tmp_path / "1.png").write_text("not a png")
    with pytest.raises(FatezeroError, match=r"1\.png"):
        read_clip(tmp_path)


def test_too_few_frames_names_the_options():
    path = shared_data("clips/brown-bear.mp4")
    with pytest.raises(FatezeroError, match=r"brown-bear.*11 frames.*--frames 20.*needs 20"):
        read_clip(path, FrameSelection(count=20))
    with pytest.raises(FatezeroError, match=r"11 frames.*--start 4 --frames 3 --stride 4.*13"):
        read_clip(path, FrameSelection(start=4, count=3, stride=4))
    with pytest.raises(FatezeroError, match=r"--start 11 --frames all"):
        read_clip(path, FrameSelection(start=11, count=None))


def test_too_few_images_in_a_folder(tmp_path):
    folder = tmp_path / "few"
    shutil.copytree(shared_data("teaser_car-turn"), folder)
    with pytest.raises(FatezeroError, match=r"8 frames.*--stride 2 needs 15"):
        read_clip(folder, FrameSelection(count=8, stride=2))


@pytest.mark.parametrize(
    ("selection", "option"),
    [({"start": -1}, "--start"), ({"count": 0}, "--frames"), ({"stride": 0}, "--stride")],
)
def test_bad_selection(selection, option):
    with pytest.raises(FatezeroError, match=option):
        FrameSelection(**selection)


def test_parse_frame_count():
    assert parse_frame_count("8") == 8
    assert parse_frame_count(" ALL ") is None
    for bad in ["0", "-2", "eight", "1.5", ""]:
        with pytest.raises(FatezeroError, match="--frames"):
            parse_frame_count(bad)


def test_bad_crop_is_a_user_error():
    with pytest.raises(FatezeroError, match="--crop"):
        read_clip(shared_data("teaser_car-turn"), crop="circle")
