"""Editing from the cache: the invariants of DESIGN 6 that hold for any weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fatezero_cli.attention import KeyFrames, VideoFrames, plain_processors
from fatezero_cli.config import EditSettings, InversionSettings
from fatezero_cli.editing import SourceSteps, edit
from fatezero_cli.errors import FatezeroError
from fatezero_cli.inversion import invert
from fatezero_cli.prompts import encode_prompts

SOURCE = "a black swan"
EDIT = "a white duck"


@pytest.fixture(scope="module")
def bundle(tiny_model_dir):
    """One model for this module: every edit sets its own attention processors."""
    from fatezero_cli.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def inverted(bundle, small_clip, tmp_path_factory):
    settings = InversionSettings(SOURCE, steps=6, capture=1.0)
    return invert(bundle, small_clip, settings, tmp_path_factory.mktemp("cache")).cache


def plain_ddim(bundle, cache, prompt, guidance):
    """Plain DDIM sampling from z_T with the same spatial-temporal UNet, no fusion."""
    unet = bundle.unet
    z = cache.step(max(cache.timesteps))["latent"]
    frames = z.shape[0]
    unet.set_attn_processor(
        plain_processors(unet, VideoFrames(frames, KeyFrames.parse("self,mid")))
    )
    scheduler = bundle.ddim_scheduler()
    scheduler.set_timesteps(len(cache.timesteps))
    text = encode_prompts(bundle.tokenizer, bundle.text_encoder, ["", prompt], "cpu", torch.float32)
    conditioning = torch.cat([text[0:1].expand(frames, -1, -1), text[1:2].expand(frames, -1, -1)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise = unet(torch.cat([z, z]), t, encoder_hidden_states=conditioning).sample
            uncond, cond = noise.chunk(2)
            z = scheduler.step(uncond + guidance * (cond - uncond), t, z).prev_sample
    return z


def test_zero_length_windows_are_exactly_plain_ddim(bundle, inverted):
    settings = EditSettings(EDIT, cross_replace=0.0, self_replace=0.0)
    result = edit(bundle, inverted, settings)
    assert torch.equal(result.latents, plain_ddim(bundle, inverted, EDIT, 7.5))


def test_reweight_acts_only_inside_the_cross_window(bundle, inverted):
    """With every window closed, reweighting changes nothing; inside the window it does."""
    closed = EditSettings(EDIT, cross_replace=0.0, self_replace=0.0, reweight={"white": 3.0})
    assert torch.equal(
        edit(bundle, inverted, closed).latents, plain_ddim(bundle, inverted, EDIT, 7.5)
    )
    plain = edit(bundle, inverted, EditSettings(EDIT)).latents
    reweighted = edit(bundle, inverted, EditSettings(EDIT, reweight={"white": 3.0})).latents
    assert (plain - reweighted).abs().max() > 1e-4


def test_fusion_changes_the_result(bundle, inverted):
    """The converse of the test above: with windows open, fusion is really applied."""
    plain = plain_ddim(bundle, inverted, EDIT, 7.5)
    fused = edit(bundle, inverted, EditSettings(EDIT)).latents
    assert (fused - plain).abs().max() > 1e-3


def test_same_edit_twice_gives_identical_frames(bundle, inverted):
    settings = EditSettings(EDIT, blend_words=("black", "swan"), reweight={"white": 2.0})
    first = edit(bundle, inverted, settings)
    second = edit(bundle, inverted, settings)
    assert (first.frames == second.frames).all()
    assert torch.equal(first.latents, second.latents)


def reconstruction_error(bundle, clip, steps, root, replace):
    cache = invert(bundle, clip, InversionSettings(SOURCE, steps=steps, capture=1.0), root).cache
    window = 1.0 if replace else 0.0
    settings = EditSettings(SOURCE, guidance=1.0, cross_replace=window, self_replace=window)
    z0 = cache.source()["z0"]
    return float((edit(bundle, cache, settings).latents - z0).norm() / z0.norm())


def test_reconstruction_with_full_replacement_returns_close_to_z0(
    tiny_model_dir, small_clip, tmp_path
):
    """DDIM inversion, then the source prompt at guidance 1 with full replacement, gives z0 back.

    A random UNet is a poor denoiser: its eps field makes first-order DDIM
    inversion drift by ~14x |z0| at any step count. Damping its output by 0.03
    gives a smooth field, where the error falls like 1/N as the method promises.
    Measured (relative error, plain / full replacement): N=6 0.104 / 0.105,
    N=20 0.051 / 0.051, N=50 0.023 / 0.023.
    """
    from fatezero_cli.models import load_model

    damped = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    with torch.no_grad():
        damped.unet.conv_out.weight.mul_(0.03)
        damped.unet.conv_out.bias.mul_(0.03)
    coarse = reconstruction_error(damped, small_clip, 6, tmp_path, replace=True)
    fine = reconstruction_error(damped, small_clip, 20, tmp_path, replace=True)
    plain = reconstruction_error(damped, small_clip, 20, tmp_path, replace=False)
    assert fine < 0.06
    assert fine < coarse / 1.8  # converges with N: discretisation, not a pairing error
    assert abs(fine - plain) < 0.005  # replacing attention does not cost accuracy


def test_edit_steps_read_the_file_of_their_own_unet_timestep(bundle, inverted, monkeypatch):
    reads, evaluated = [], []
    original = SourceSteps.at

    def spy(self, timestep):
        reads.append(timestep)
        return original(self, timestep)

    monkeypatch.setattr(SourceSteps, "at", spy)
    handle = bundle.unet.register_forward_pre_hook(
        lambda module, args: evaluated.append(int(args[1]))
    )
    try:
        edit(bundle, inverted, EditSettings(EDIT, cross_replace=0.5, self_replace=0.5))
    finally:
        handle.remove()
    fused_steps = 3  # floor(0.5 * 6)
    # the first read is z_T (the file of the largest timestep), then one read per fused step
    assert reads[0] == max(inverted.timesteps)
    assert reads[1:] == evaluated[:fused_steps]
    assert evaluated == sorted(inverted.timesteps, reverse=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"blend_words": ("goose",)}, "goose"),
        ({"reweight": {"swan": 2.0}}, "swan"),
        ({"cross_replace_words": {"goose": 0.3}}, "goose"),
        ({"latent_blend": True}, "--latent-blend needs --blend"),
    ],
)
def test_words_that_are_not_in_the_prompt_are_clear_errors(bundle, inverted, changes, message):
    with pytest.raises(FatezeroError, match=message):
        edit(bundle, inverted, dataclasses.replace(EditSettings(EDIT), **changes))


def test_an_edit_needing_more_than_the_cache_kept_fails_clearly(bundle, small_clip, tmp_path):
    settings = InversionSettings(SOURCE, steps=4, capture=0.5)
    cache = invert(bundle, small_clip, settings, tmp_path).cache
    with pytest.raises(FatezeroError, match="--capture"):
        edit(bundle, cache, EditSettings(EDIT, cross_replace=0.8, self_replace=0.5))
    with pytest.raises(FatezeroError, match="--capture-all-layers"):
        edit(
            bundle,
            cache,
            EditSettings(EDIT, cross_replace=0.5, self_replace=0.5, fuse_all_layers=True),
        )
    # within what was kept, it works
    edit(bundle, cache, EditSettings(EDIT, cross_replace=0.5, self_replace=0.5))


def test_latent_blend_and_masks(bundle, inverted):
    settings = EditSettings(EDIT, blend_words=("swan",), latent_blend=True)
    result = edit(bundle, inverted, settings, want_masks=True)
    assert result.masks is not None
    assert result.masks.shape == (inverted.source()["z0"].shape[0], 8, 8)
    assert result.masks.min() >= 0.0 and result.masks.max() <= 1.0
