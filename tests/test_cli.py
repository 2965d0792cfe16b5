"""The `fatezero` command as a user and a shell script see it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fatezero_cli.cli import main
from fatezero_cli.video import FrameSelection, read_clip

SWAN_SRC = "a black swan with a red beak swimming in a river near a wall and bushes"
SWAN_DUCK = "a white duck with a yellow beak swimming in a river near a wall and bushes"
SWAN_FLAMINGO = "a pink flamingo with a red beak swimming in a river near a wall and bushes"
SMALL = ["--size", "128", "--frames", "4", "--steps", "10"]
TINY = ["--size", "64", "--frames", "2", "--steps", "2"]


def fatezero(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def invert_swan(capsys, swan: Path, *options: str) -> Path:
    """`fatezero invert` on the swan clip with the source prompt; returns the cache path."""
    code, out, err = fatezero(capsys, "invert", str(swan), "--src", SWAN_SRC, "--quiet", *options)
    assert code == 0, err
    return Path(out.strip())


def fatezero_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, as a shell script would."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fatezero_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def test_help_lists_the_commands_and_each_has_an_example(capsys):
    code, out, _ = fatezero(capsys, "--help")
    assert code == 0
    for command in ("invert", "edit", "run", "tune", "cache"):
        assert command in out
    for command in ("invert", "edit", "run", "tune"):
        code, out, _ = fatezero(capsys, command, "--help")
        assert code == 0 and "Example" in out and "--quiet" in out
    code, out, _ = fatezero(capsys, "run", "--help")
    for option in (
        "--src",
        "--model",
        "--size",
        "--frames",
        "--stride",
        "--start",
        "--steps",
        "--key-frames",
        "--cache-dir",
        "--device",
        "--dtype",
        "--seed",
        "--json",
        "--output",
        "--edit",
        "--blend",
        "--reweight",
        "--self-replace",
    ):
        assert option in out, option


def test_version(capsys):
    code, out, _ = fatezero(capsys, "--version")
    assert code == 0 and out.startswith("fatezero-cli ")


def test_tune_is_not_built_yet_and_says_so(capsys, tmp_path):
    code, out, err = fatezero(capsys, "tune", str(tmp_path), "--src", "a swan")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "not available" in err


@pytest.fixture
def swan(shared_data):
    return shared_data / "clips" / "black-swan.mp4"


def test_run_black_swan_end_to_end_then_edits_reuse_the_cache(
    capsys, swan, tiny_model_dir, tmp_path, monkeypatch
):
    """The issue's acceptance run: a 4-frame mp4 at the clip's fps, then two cached edits."""
    monkeypatch.chdir(tmp_path)
    cache_dir = tmp_path / "cache"
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(cache_dir), *SMALL]
    code, out, err = fatezero(
        capsys,
        "run",
        str(swan),
        "--src",
        SWAN_SRC,
        "--edit",
        SWAN_DUCK,
        "--blend",
        "black swan",
        "--save-masks",
        "--json",
        "--quiet",
        *common,
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["inversion"]["hit"] is False
    output = Path(report["outputs"][0]["output"])
    assert output.parent == Path("outputs") and output.suffix == ".mp4"
    written = read_clip(output, FrameSelection(count=None), size=128)
    assert written.frames.shape == (4, 128, 128, 3)
    assert written.fps == pytest.approx(24.0)
    record = json.loads(Path(report["outputs"][0]["settings"]).read_text())
    assert record["edit"]["prompt"] == SWAN_DUCK and record["cache"] == report["inversion"]["key"]
    assert record["edit"]["blend_words"] == ["black", "swan"]
    assert Path(report["outputs"][0]["masks"]).is_file()
    assert report["outputs"][0]["edit"] == record["edit"]  # --json reports the settings used

    # two more edits from the same cache: `edit` never inverts, `run` finds the cache
    key = report["inversion"]["key"]
    code, out, err = fatezero(
        capsys,
        "edit",
        key[:8],
        "--edit",
        SWAN_FLAMINGO,
        "--blend",
        "black swan",
        "--cache-dir",
        str(cache_dir),
        "--json",
        "--quiet",
    )
    assert code == 0, err
    assert json.loads(out)["cache"] == key
    code, out, err = fatezero(
        capsys,
        "run",
        str(swan),
        "--src",
        SWAN_SRC,
        "--edit",
        SWAN_FLAMINGO,
        "--json",
        "--quiet",
        *common,
    )
    assert code == 0, err
    again = json.loads(out)
    assert again["inversion"]["hit"] is True and again["inversion"]["key"] == key
    names = sorted(p.name for p in Path("outputs").glob("*.mp4"))
    assert len(names) == 4  # duck, duck masks, flamingo, flamingo again (not overwritten)


def test_stride_divides_the_fps(capsys, swan, tiny_model_dir, tmp_path):
    out_path = tmp_path / "duck.gif"
    code, _, err = fatezero(
        capsys,
        "run",
        str(swan),
        "--src",
        SWAN_SRC,
        "--edit",
        SWAN_DUCK,
        "--stride",
        "2",
        "--model",
        str(tiny_model_dir),
        "--cache-dir",
        str(tmp_path / "c"),
        "-o",
        str(out_path),
        "--quiet",
        "--size",
        "64",
        "--frames",
        "2",
        "--steps",
        "2",
    )
    assert code == 0, err
    assert read_clip(out_path, FrameSelection(count=None), size=64).fps == pytest.approx(12.5, 0.05)


def test_invert_json_then_hit(capsys, swan, tiny_model_dir, tmp_path):
    args = [
        "invert",
        str(swan),
        "--src",
        SWAN_SRC,
        "--model",
        str(tiny_model_dir),
        "--cache-dir",
        str(tmp_path),
        "--json",
        "--quiet",
        *SMALL,
    ]
    code, out, err = fatezero(capsys, *args)
    assert code == 0, err
    first = json.loads(out)
    assert set(first) >= {"cache", "key", "hit", "frames", "steps", "bytes"}
    assert first["hit"] is False and first["frames"] == 4 and first["steps"] == 10
    assert first["bytes"] == sum(
        f.stat().st_size
        for f in Path(first["cache"]).rglob("*")
        if f.is_file() and f.name != "manifest.json"
    )
    code, out, _ = fatezero(capsys, *args)
    assert json.loads(out)["hit"] is True
    code, out, _ = fatezero(capsys, *args[: -2 - len(SMALL)], "--quiet", *SMALL)
    assert out.strip() == first["cache"]  # without --json: the cache directory, one line


def test_invert_then_edit_in_two_processes_equals_run_in_one(
    capsys, swan, tiny_model_dir, tmp_path
):
    common = ["--model", str(tiny_model_dir), *SMALL]
    edit_args = ["--edit", SWAN_DUCK, "--blend", "black swan", "--reweight", "white=1.5"]
    inverted = fatezero_process(
        "invert",
        str(swan),
        "--src",
        SWAN_SRC,
        "--cache-dir",
        str(tmp_path / "a"),
        "--quiet",
        *common,
        cwd=tmp_path,
    )
    assert inverted.returncode == 0, inverted.stderr
    edited = fatezero_process(
        "edit",
        inverted.stdout.strip(),
        *edit_args,
        "-o",
        str(tmp_path / "two"),
        "--quiet",
        cwd=tmp_path,
    )
    assert edited.returncode == 0, edited.stderr
    code, _, err = fatezero(
        capsys,
        "run",
        str(swan),
        "--src",
        SWAN_SRC,
        *edit_args,
        "--cache-dir",
        str(tmp_path / "b"),
        "-o",
        str(tmp_path / "one"),
        "--quiet",
        *common,
    )
    assert code == 0, err
    two = sorted((tmp_path / "two").glob("*.png"))
    one = sorted((tmp_path / "one").glob("*.png"))
    assert [p.name for p in two] == [p.name for p in one] and len(one) == 4
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(read_png(a), read_png(b))


def test_the_same_edit_command_twice_gives_identical_frames(capsys, swan_cache, tmp_path):
    args = ["edit", str(swan_cache), "--edit", SWAN_DUCK, "--blend", "black swan", "--quiet"]
    for name in ("first", "second"):
        code, _, err = fatezero(capsys, *args, "-o", str(tmp_path / name))
        assert code == 0, err
    first = sorted((tmp_path / "first").glob("*.png"))
    second = sorted((tmp_path / "second").glob("*.png"))
    assert len(first) == 4 and [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(read_png(a), read_png(b))


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


@pytest.fixture
def swan_cache(capsys, swan, tiny_model_dir, tmp_path) -> Path:
    return invert_swan(
        capsys, swan, "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), *SMALL
    )


def one_clear_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fatezero: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--blend", "goose"], ["goose"]),
        (["--reweight", "goose=2"], ["goose"]),
        (["--reweight", "white"], ["--reweight", "WORD=VALUE"]),
        (["--self-replace", "1.5"], ["--self-replace"]),
    ],
)
def test_bad_edit_options_are_one_clear_line(capsys, swan_cache, tmp_path, options, fragments):
    code, _, err = fatezero(
        capsys,
        "edit",
        str(swan_cache),
        "--edit",
        SWAN_DUCK,
        *options,
        "-o",
        str(tmp_path / "x.mp4"),
        "--quiet",
    )
    one_clear_line(code, err, *fragments)
    assert not (tmp_path / "x.mp4").exists()


def test_bad_inputs_are_one_clear_line(capsys, tiny_model_dir, tmp_path, swan_cache):
    missing = tmp_path / "nope.mp4"
    code, _, err = fatezero(capsys, "invert", str(missing), "--src", "a swan", "--quiet")
    one_clear_line(code, err, str(missing))
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    code, _, err = fatezero(capsys, "invert", str(text), "--src", "a swan", "--quiet")
    one_clear_line(code, err, "notes.mp4")
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    code, _, err = fatezero(
        capsys, "edit", str(swan_cache), "--edit", "x", "--model", str(bad_model), "--quiet"
    )
    one_clear_line(code, err)
    code, _, err = fatezero(
        capsys, "edit", "0000ffff", "--edit", "x", "--cache-dir", str(tmp_path / "empty"), "--quiet"
    )
    one_clear_line(code, err, "no cache")


def test_existing_output_is_never_overwritten_silently(capsys, swan_cache, tmp_path):
    target = tmp_path / "duck.mp4"
    target.write_bytes(b"precious")
    args = ["edit", str(swan_cache), "--edit", SWAN_DUCK, "-o", str(target), "--quiet"]
    code, _, err = fatezero(capsys, *args)
    one_clear_line(code, err, "--overwrite")
    assert target.read_bytes() == b"precious"
    code, _, err = fatezero(capsys, *args, "--overwrite")
    assert code == 0, err and target.read_bytes() != b"precious"


def test_a_cache_from_another_model_is_refused(capsys, swan_cache, tmp_path):
    from fatezero_cli.testing import save_tiny_model

    other = save_tiny_model(tmp_path / "other-model", seed=1)
    capsys.readouterr()  # what saving the model printed is not the CLI's output
    code, _, err = fatezero(
        capsys, "edit", str(swan_cache), "--edit", SWAN_DUCK, "--model", str(other), "--quiet"
    )
    one_clear_line(code, err, "inverted with model")


def test_a_damaged_cache_is_refused(capsys, swan_cache, tmp_path):
    step = sorted((swan_cache / "steps").iterdir())[-1]
    data = bytearray(step.read_bytes())
    data[-1] ^= 0xFF
    step.write_bytes(bytes(data))
    code, _, err = fatezero(
        capsys,
        "edit",
        str(swan_cache),
        "--edit",
        SWAN_DUCK,
        "-o",
        str(tmp_path / "x.mp4"),
        "--quiet",
    )
    one_clear_line(code, err, "checksum")
    code, out, err = fatezero(capsys, "cache", "verify", str(swan_cache), "--json")
    assert code == 2 and json.loads(out)["ok"] is False
    assert not (tmp_path / "x.mp4").exists()


def test_cache_commands(capsys, swan_cache):
    root = swan_cache.parent
    code, out, _ = fatezero(capsys, "cache", "list", "--cache-dir", str(root), "--json")
    listing = json.loads(out)
    assert code == 0 and [c["key"] for c in listing["caches"]] == [swan_cache.name]
    assert listing["caches"][0]["complete"] is True
    code, out, _ = fatezero(capsys, "cache", "list", "--cache-dir", str(root))
    assert code == 0 and swan_cache.name in out
    code, out, _ = fatezero(
        capsys, "cache", "info", swan_cache.name[:6], "--cache-dir", str(root), "--json"
    )
    info = json.loads(out)
    assert info["inputs"]["source_prompt"] == SWAN_SRC and info["captured_steps"] == 8
    code, out, _ = fatezero(capsys, "cache", "verify", swan_cache.name, "--cache-dir", str(root))
    assert code == 0 and "ok" in out
    code, _, _ = fatezero(
        capsys, "cache", "rm", swan_cache.name, "--cache-dir", str(root), "--quiet"
    )
    assert code == 0 and not swan_cache.exists()


def test_single_file_checkpoint_with_local_config(capsys, swan, tiny_model_dir, tmp_path):
    """--model file.safetensors --model-config FOLDER; a later edit finds both in the cache."""
    from fatezero_cli.testing import save_ldm_checkpoint

    checkpoint = save_ldm_checkpoint(tiny_model_dir, tmp_path / "tiny.safetensors")
    cache = invert_swan(
        capsys,
        swan,
        "--model",
        str(checkpoint),
        "--model-config",
        str(tiny_model_dir),
        "--cache-dir",
        str(tmp_path / "c"),
        *TINY,
    )
    code, _, err = fatezero(
        capsys, "edit", str(cache), "--edit", SWAN_DUCK, "-o", str(tmp_path / "d.gif"), "--quiet"
    )
    assert code == 0, err
    assert (tmp_path / "d.gif").is_file()


def test_weights_replaced_behind_the_same_path_are_refused(capsys, swan, tmp_path):
    """`edit` without --model reloads the cache's model path: it must still be those weights."""
    import shutil

    from fatezero_cli.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "model", seed=0)
    cache = invert_swan(
        capsys, swan, "--model", str(model), "--cache-dir", str(tmp_path / "c"), *TINY
    )
    shutil.rmtree(model)
    save_tiny_model(model, seed=1)
    capsys.readouterr()
    code, _, err = fatezero(capsys, "edit", str(cache), "--edit", SWAN_DUCK, "--quiet")
    one_clear_line(code, err, "inverted with model")


def test_run_reports_a_bad_edit_before_inverting(capsys, swan, tiny_model_dir, tmp_path):
    code, _, err = fatezero(
        capsys,
        "run",
        str(swan),
        "--src",
        SWAN_SRC,
        "--edit",
        SWAN_DUCK,
        "--blend",
        "red jeep",
        "--model",
        str(tiny_model_dir),
        "--cache-dir",
        str(tmp_path / "c"),
        "--quiet",
        *SMALL,
    )
    one_clear_line(code, err, "jeep")
    from fatezero_cli.cache import list_cache_dirs

    assert list_cache_dirs(tmp_path / "c") == []  # nothing was inverted


def test_ctrl_c_during_inversion_exits_130_and_keeps_no_cache(
    capsys, swan, tiny_model_dir, tmp_path, monkeypatch
):
    from fatezero_cli import inversion
    from fatezero_cli.cache import list_cache_dirs

    def interrupted_step(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inversion, "step_file", interrupted_step)
    code, out, err = fatezero(
        capsys,
        "invert",
        str(swan),
        "--src",
        SWAN_SRC,
        "--model",
        str(tiny_model_dir),
        "--cache-dir",
        str(tmp_path),
        "--quiet",
        *TINY,
    )
    assert code == 130 and out == ""
    assert err.strip() == "fatezero: error: interrupted; no partial output or cache was kept"
    assert list_cache_dirs(tmp_path) == []
