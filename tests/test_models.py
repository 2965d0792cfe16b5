"""Model loading: the same code that loads real SD 1.x weights, driven with a tiny model."""

import shutil
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from fatezero_cli.errors import FatezeroError
from fatezero_cli.models import (
    HASH_MEMO_FILE,
    ddim_scheduler_config,
    load_model,
    model_identity,
    resolve_device,
    resolve_dtype,
)
from fatezero_cli.testing import save_ldm_checkpoint, save_tiny_model, sd_sized_unet

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
HUB_REPO = "fatezero-test/tiny-sd"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SD1_DDIM_SETTINGS = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def load_cpu(model, **kwargs):
    return load_model(str(model), device="cpu", dtype="fp32", **kwargs)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))


def one_line_error(match: str, load, *args, **kwargs) -> str:
    with pytest.raises(FatezeroError, match=match) as raised:
        load(*args, **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


def unet_output(bundle, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    tokens = bundle.tokenizer(
        "a silver jeep", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = bundle.text_encoder(tokens).last_hidden_state
        return bundle.unet(latents, 501, encoder_hidden_states=text).sample


# --- a diffusers folder --------------------------------------------------------------------


def test_tiny_folder_loads_as_sd1_components(tiny_bundle):
    bundle = tiny_bundle
    assert isinstance(bundle.unet, UNet2DConditionModel)
    assert isinstance(bundle.vae, AutoencoderKL)
    assert isinstance(bundle.text_encoder, CLIPTextModel)
    assert isinstance(bundle.tokenizer, CLIPTokenizer)
    assert bundle.device == torch.device("cpu") and bundle.dtype == torch.float32
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())
    assert bundle.tokenizer.model_max_length == 77
    assert bundle.vae.config.scaling_factor == pytest.approx(0.18215)
    assert {type(p) for p in bundle.unet.attn_processors.values()} == {AttnProcessor2_0}


def test_tiny_unet_has_the_sd1_attention_layout(tiny_bundle):
    cross_attention = [n for n, _ in tiny_bundle.unet.named_modules() if n.endswith("attn2")]
    assert len(cross_attention) == 16  # 6 down, 1 mid, 9 up, as in SD 1.x
    text_width = tiny_bundle.text_encoder.config.hidden_size
    assert tiny_bundle.unet.config.cross_attention_dim == text_width


def test_sd_sized_unet_has_the_sd1_size():
    with torch.device("meta"):
        unet = sd_sized_unet()
    parameters = sum(p.numel() for p in unet.parameters())
    assert 859_000_000 < parameters < 860_000_000
    assert unet.config.cross_attention_dim == 768


def test_missing_scheduler_folder_means_sd1_schedule(model_copy):
    shutil.rmtree(model_copy / "scheduler")
    config = load_cpu(model_copy).scheduler_config
    assert (config["beta_start"], config["beta_end"]) == (0.00085, 0.012)
    assert config["beta_schedule"] == "scaled_linear"
    assert config["prediction_type"] == "epsilon"


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["unet", "tokenizer"])
def test_missing_component_folder_is_named(model_copy, missing):
    shutil.rmtree(model_copy / missing)
    message = one_line_error(f"has no {missing}/", load_cpu, model_copy)
    assert "expected a diffusers folder" in message


def test_corrupt_weights_are_one_clear_line(model_copy):
    (model_copy / UNET_WEIGHTS).write_bytes(b"not a safetensors file")
    one_line_error("cannot load unet from", load_cpu, model_copy)


@pytest.mark.parametrize("model", ["./no/such/model", "no-such-file.safetensors", "/nowhere"])
def test_nonexistent_path(model):
    one_line_error("no such model path", load_cpu, model)


def test_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    one_line_error("not a .safetensors or .ckpt", load_cpu, tmp_path / "weights.txt")


def test_uncached_hub_id_fails_fast_with_one_clear_error():
    started = time.monotonic()
    message = one_line_error(
        "neither in the local Hugging Face cache nor reachable",
        load_cpu,
        "fatezero-test/not-a-cached-model",
    )
    assert "--model accepts a local diffusers folder or a .safetensors/.ckpt file" in message
    assert time.monotonic() - started < 10


# --- a hub id ------------------------------------------------------------------------------


def test_cached_hub_id_loads_offline_with_its_revision(tiny_model_dir, hf_cache):
    repo = hf_cache / f"models--{HUB_REPO.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)

    bundle = load_cpu(HUB_REPO)

    expected = {"name": HUB_REPO, "kind": "hub", "revision": HUB_COMMIT}
    assert bundle.identity == expected
    assert model_identity(HUB_REPO) == expected
    assert torch.equal(unet_output(bundle), unet_output(load_cpu(tiny_model_dir)))


# --- identity ------------------------------------------------------------------------------


def test_identity_is_stable_across_loads_and_moves(tiny_model_dir, model_copy):
    first, second = load_cpu(tiny_model_dir).identity, load_cpu(tiny_model_dir).identity
    assert first == second
    assert first["kind"] == "folder" and len(first["sha256"]) == 64
    moved = model_identity(str(model_copy))
    assert moved["sha256"] == first["sha256"] and moved["name"] != first["name"]


def test_identity_changes_when_a_weight_file_changes(model_copy, tmp_path):
    cache_root = tmp_path / "cache"
    before = load_cpu(model_copy, cache_root=cache_root).identity
    assert (cache_root / HASH_MEMO_FILE).is_file()
    weights = load_file(model_copy / UNET_WEIGHTS)
    weights["conv_out.bias"] = weights["conv_out.bias"] + 1e-3
    save_file(weights, model_copy / UNET_WEIGHTS)  # same size: only the memo's mtime notices
    assert model_identity(str(model_copy), cache_root)["sha256"] != before["sha256"]


def test_identity_changes_when_the_tokenizer_changes(model_copy, tmp_path):
    before = model_identity(str(model_copy))
    config = model_copy / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("77", "76"))
    assert model_identity(str(model_copy))["sha256"] != before["sha256"]


def test_saving_the_tiny_model_is_deterministic(tiny_model_dir, tmp_path):
    same_seed = save_tiny_model(tmp_path / "same")
    other_seed = save_tiny_model(tmp_path / "other", seed=1)
    reference = model_identity(str(tiny_model_dir))["sha256"]
    assert model_identity(str(same_seed))["sha256"] == reference
    assert model_identity(str(other_seed))["sha256"] != reference


# --- device and dtype ----------------------------------------------------------------------


def test_default_device_follows_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["gpu0", "meta", "cuda:999"])
def test_unusable_device_is_a_user_error(device):
    with pytest.raises(FatezeroError, match="device"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_cuda_is_a_user_error():
    with pytest.raises(FatezeroError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        (None, "cpu", torch.float32),
        (None, "cuda", torch.float16),
        ("fp32", "cpu", torch.float32),
        ("float32", "cuda", torch.float32),
        ("FP16", "cuda", torch.float16),
        ("float16", "cuda", torch.float16),
        ("bf16", "cpu", torch.bfloat16),
    ],
)
def test_resolve_dtype(name, device, expected):
    assert resolve_dtype(name, torch.device(device)) == expected


@pytest.mark.parametrize(("name", "match"), [("fp16", "not supported on cpu"), ("int8", "unknown")])
def test_bad_dtype_is_a_user_error(name, match):
    with pytest.raises(FatezeroError, match=match):
        resolve_dtype(name, torch.device("cpu"))


def test_fp16_on_cpu_is_refused_before_loading(tiny_model_dir):
    one_line_error("fp16", load_model, str(tiny_model_dir), device="cpu", dtype="fp16")


# --- scheduler -----------------------------------------------------------------------------


def test_sd1_pndm_scheduler_becomes_ddim_with_forced_settings(tiny_bundle):
    config = tiny_bundle.scheduler_config
    assert SD1_DDIM_SETTINGS.items() <= config.items()
    assert config["prediction_type"] == "epsilon"
    scheduler, inverse = tiny_bundle.ddim_scheduler(), tiny_bundle.ddim_inverse_scheduler()
    assert type(scheduler) is DDIMScheduler and type(inverse) is DDIMInverseScheduler
    assert scheduler is not tiny_bundle.ddim_scheduler()
    for instance in (scheduler, inverse):
        assert SD1_DDIM_SETTINGS.items() <= dict(instance.config).items()


def test_forced_settings_override_the_model():
    shipped = {"clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0, "beta_end": 0.02}
    config = ddim_scheduler_config(shipped)
    assert SD1_DDIM_SETTINGS.items() <= config.items()
    assert config["beta_end"] == 0.02


def test_v_prediction_is_honoured(tmp_path):
    bundle = load_cpu(save_tiny_model(tmp_path / "v", prediction_type="v_prediction"))
    assert bundle.scheduler_config["prediction_type"] == "v_prediction"
    assert bundle.ddim_scheduler().config.prediction_type == "v_prediction"
    assert bundle.ddim_inverse_scheduler().config.prediction_type == "v_prediction"


def test_unsupported_prediction_type_is_a_user_error():
    with pytest.raises(FatezeroError, match="prediction_type 'sample'"):
        ddim_scheduler_config({"prediction_type": "sample"})


# --- a single-file checkpoint --------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_matches_the_folder(tiny_model_dir, tmp_path, suffix):
    checkpoint = save_ldm_checkpoint(tiny_model_dir, tmp_path / f"tiny{suffix}")
    from_file = load_cpu(checkpoint, config=tiny_model_dir)
    from_folder = load_cpu(tiny_model_dir)
    assert torch.equal(unet_output(from_file), unet_output(from_folder))
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        encoded = [b.vae.encode(pixels).latent_dist.mean for b in (from_file, from_folder)]
    assert torch.equal(*encoded)
    assert from_file.scheduler_config == from_folder.scheduler_config
    assert from_file.identity["kind"] == "file"
    assert {"sha256", "config_sha256"} <= from_file.identity.keys()


def test_single_file_without_config_asks_for_one(tiny_model_dir, tmp_path):
    checkpoint = save_ldm_checkpoint(tiny_model_dir, tmp_path / "tiny.safetensors")
    one_line_error("pass a local diffusers folder", load_cpu, checkpoint)


def test_single_file_config_must_be_a_diffusers_folder(tiny_model_dir, tmp_path):
    checkpoint = save_ldm_checkpoint(tiny_model_dir, tmp_path / "tiny.safetensors")
    one_line_error("no model_index.json", load_cpu, checkpoint, config=tmp_path)


def test_corrupt_single_file_is_one_clear_line(tiny_model_dir, tmp_path):
    checkpoint = tmp_path / "broken.safetensors"
    checkpoint.write_bytes(b"\x00" * 64)
    one_line_error("cannot load checkpoint", load_cpu, checkpoint, config=tiny_model_dir)


def test_a_spacing_ddim_cannot_invert_falls_back_to_leading():
    from fatezero_cli.models import ddim_scheduler_config

    config = ddim_scheduler_config({"timestep_spacing": "linspace"})
    assert config["timestep_spacing"] == "leading"
    assert ddim_scheduler_config({"timestep_spacing": "trailing"})["timestep_spacing"] == "trailing"
