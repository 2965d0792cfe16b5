"""Inversion into the content-addressed cache (DESIGN 3.2, 4)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fatezero_cli.cache import MANIFEST, Cache, content_key, resolve_cache, step_file
from fatezero_cli.config import InversionSettings
from fatezero_cli.errors import FatezeroError
from fatezero_cli.inversion import cache_inputs, captured_timesteps, invert

SETTINGS = InversionSettings("a black swan", steps=4, capture=0.5)


def key_of(bundle, clip, settings=SETTINGS):
    return content_key(cache_inputs(bundle, clip, settings))


def test_key_changes_with_every_input_that_matters(tiny_bundle, small_clip):
    base = key_of(tiny_bundle, small_clip)
    changed_frames = dataclasses.replace(small_clip, frames=small_clip.frames.copy())
    changed_frames.frames[0, 0, 0, 0] ^= 1
    variants = {
        "frames": key_of(tiny_bundle, changed_frames),
        "prompt": key_of(
            tiny_bundle, small_clip, dataclasses.replace(SETTINGS, source_prompt="a swan")
        ),
        "steps": key_of(tiny_bundle, small_clip, dataclasses.replace(SETTINGS, steps=5)),
        "key frames": key_of(
            tiny_bundle, small_clip, dataclasses.replace(SETTINGS, key_frames="first,previous")
        ),
        "capture": key_of(tiny_bundle, small_clip, dataclasses.replace(SETTINGS, capture=0.75)),
    }
    other_model = dataclasses.replace(
        tiny_bundle, identity={**tiny_bundle.identity, "sha256": "0" * 64}
    )
    variants["model"] = key_of(other_model, small_clip)
    other_dtype = dataclasses.replace(tiny_bundle, dtype=torch.float16)
    variants["dtype"] = key_of(other_dtype, small_clip)
    for name, key in variants.items():
        assert key != base, f"changing the {name} must change the key"
    # the key holds how many steps are kept, not the fraction: 0.6 of 4 steps is 2, as 0.5
    same_steps = dataclasses.replace(SETTINGS, capture=0.6)
    assert key_of(tiny_bundle, small_clip, same_steps) == base
    assert len(set(variants.values())) == len(variants)


def test_key_ignores_where_things_live(tiny_bundle, small_clip, tmp_path):
    """Output path, cache directory, model path and source file name are not inputs."""
    moved = dataclasses.replace(small_clip, source=tmp_path / "elsewhere.mp4")
    relocated_model = dataclasses.replace(
        tiny_bundle, identity={**tiny_bundle.identity, "name": "/other/place"}
    )
    assert key_of(tiny_bundle, moved) == key_of(tiny_bundle, small_clip)
    assert key_of(relocated_model, small_clip) == key_of(tiny_bundle, small_clip)
    first = invert(tiny_bundle, small_clip, SETTINGS, tmp_path / "a")
    second = invert(tiny_bundle, small_clip, SETTINGS, tmp_path / "b")
    assert first.cache.key == second.cache.key


@pytest.fixture
def inverted(tiny_bundle, small_clip, tmp_path):
    return invert(tiny_bundle, small_clip, SETTINGS, tmp_path)


def test_cache_holds_latents_and_the_captured_steps(inverted, tiny_bundle, small_clip):
    cache = inverted.cache
    assert not inverted.hit
    assert cache.timesteps == sorted(cache.timesteps) and len(cache.timesteps) == 4
    # capture 0.5 of 4 steps: the two noisiest, i.e. the two largest timesteps
    assert sorted(cache.captured_timesteps) == cache.timesteps[2:]
    source = cache.source()
    np.testing.assert_array_equal(source["frames"].numpy(), small_clip.frames)
    assert source["z0"].shape == (len(small_clip.frames), 4, 8, 8)
    for timestep in cache.timesteps:
        step = cache.step(timestep)
        assert step["latent"].shape == source["z0"].shape
        assert (len(step) > 1) == (timestep in cache.captured_timesteps)
    manifest = json.loads((cache.path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"source.safetensors"} | {
        step_file(t) for t in cache.timesteps
    }
    on_disk = sum((cache.path / name).stat().st_size for name in manifest["files"])
    assert manifest["bytes"] == on_disk == inverted.summary()["bytes"]


def test_second_invert_is_a_hit_and_rewrites_nothing(inverted, tiny_bundle, small_clip, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in inverted.cache.path.rglob("*")}
    calls = []
    handle = tiny_bundle.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = invert(tiny_bundle, small_clip, SETTINGS, tmp_path)
    finally:
        handle.remove()
    assert again.hit and again.cache.key == inverted.cache.key
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in again.cache.path.rglob("*")} == before


def test_inversion_follows_ddim_inverse_by_timestep(inverted, tiny_bundle):
    """Step i runs the UNet at t_i (ascending) on the previous latent: recompute one step."""
    cache = inverted.cache
    t0, t1 = cache.timesteps[:2]
    text = cache.source()["source_text"]
    previous = cache.step(t0)["latent"]
    scheduler = tiny_bundle.ddim_inverse_scheduler()
    scheduler.set_timesteps(len(cache.timesteps))
    assert [int(t) for t in scheduler.timesteps] == cache.timesteps
    from fatezero_cli.attention import KeyFrames, VideoFrames, plain_processors

    unet = tiny_bundle.unet
    unet.set_attn_processor(
        plain_processors(unet, VideoFrames(previous.shape[0], KeyFrames.parse("self,mid")))
    )
    with torch.no_grad():
        noise = unet(previous, t1, encoder_hidden_states=text.expand(previous.shape[0], -1, -1))
    expected = scheduler.step(noise.sample, t1, previous).prev_sample
    torch.testing.assert_close(cache.step(t1)["latent"], expected, rtol=0, atol=1e-5)


def test_inverse_and_forward_ddim_pair_exactly_by_timestep(tiny_bundle):
    """With an eps that depends on t only, inverting then denoising returns z0 (measured: 8e-6).

    Any off-by-one between the inversion's and the edit's timesteps breaks this.
    """
    inverse, forward = tiny_bundle.ddim_inverse_scheduler(), tiny_bundle.ddim_scheduler()
    inverse.set_timesteps(50)
    forward.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, 8, 8, generator=generator) * 0.06
    eps = {int(t): torch.randn(1, 4, 8, 8, generator=generator) * 0.3 for t in inverse.timesteps}
    z = z0
    for t in inverse.timesteps:
        z = inverse.step(eps[int(t)], t, z).prev_sample
    for t in forward.timesteps:
        z = forward.step(eps[int(t)], t, z).prev_sample
    assert float((z - z0).norm() / z0.norm()) < 1e-4


def test_captured_timesteps_are_the_noisiest():
    steps = [1, 21, 41, 61, 81]
    assert captured_timesteps(steps, InversionSettings("x", steps=5, capture=0.4)) == [61, 81]
    assert captured_timesteps(steps, InversionSettings("x", steps=5, capture=0.0)) == []


def test_missing_manifest_is_refused(inverted):
    (inverted.cache.path / MANIFEST).unlink()
    with pytest.raises(FatezeroError, match="incomplete"):
        Cache.open(inverted.cache.path)


def test_missing_shard_is_refused(inverted):
    (inverted.cache.path / step_file(inverted.cache.timesteps[-1])).unlink()
    with pytest.raises(FatezeroError, match="missing"):
        Cache.open(inverted.cache.path)


def test_wrong_checksum_is_refused(inverted):
    path = inverted.cache.path / step_file(inverted.cache.timesteps[-1])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = Cache.open(inverted.cache.path)
    assert cache.verify() == [f"{step_file(inverted.cache.timesteps[-1])}: checksum mismatch"]
    with pytest.raises(FatezeroError, match="checksum"):
        cache.step(inverted.cache.timesteps[-1])


def test_interrupted_inversion_leaves_no_cache_and_is_redone(
    tiny_bundle, small_clip, tmp_path, monkeypatch
):
    from fatezero_cli import inversion

    def interrupted(*args, **kwargs):
        writer = args[4]
        writer.write("source.safetensors", {"x": torch.zeros(1)})
        raise KeyboardInterrupt

    monkeypatch.setattr(inversion, "run_inversion", interrupted)
    with pytest.raises(KeyboardInterrupt):
        invert(tiny_bundle, small_clip, SETTINGS, tmp_path)
    key = key_of(tiny_bundle, small_clip)
    assert not (tmp_path / key).exists()
    monkeypatch.undo()
    # a crash that left files without a manifest (e.g. SIGKILL) is cleaned up and redone
    (tmp_path / key / "steps").mkdir(parents=True)
    (tmp_path / key / "steps" / "t0001.safetensors").write_bytes(b"partial")
    with pytest.raises(FatezeroError, match="incomplete"):
        Cache.open(tmp_path / key)
    result = invert(tiny_bundle, small_clip, SETTINGS, tmp_path)
    assert not result.hit and Cache.open(result.cache.path).verify() == []


def test_caches_resolve_by_key_prefix_or_path(inverted, tmp_path):
    key = inverted.cache.key
    assert resolve_cache(key[:6], tmp_path) == inverted.cache.path
    assert resolve_cache(str(inverted.cache.path), tmp_path) == inverted.cache.path
    with pytest.raises(FatezeroError, match="no cache"):
        resolve_cache("zzzz", tmp_path)
