"""Random-weight Stable Diffusion 1.x models built offline, for tests and benchmarks.

These machines cannot download weights (DESIGN section 6), so tests drive the real loading code
with a tiny model that has the SD 1.x *layout* (same blocks, same number of attention layers,
same key names) but a few channels. Benchmarks time the full-size UNet with random weights,
because speed does not depend on what the weights are.
"""

import re
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fatezero_cli.testing_tokenizer import write_tiny_tokenizer

SD1_DOWN_BLOCKS = (
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
)
SD1_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
TINY_TEXT_HIDDEN_SIZE = 32


def _seeded_build(seed: int, build):
    """Run `build()` under a fixed seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _sd1_unet(
    seed: int, channels: tuple[int, ...], heads: int, text_width: int, groups: int, size: int
) -> UNet2DConditionModel:
    return _seeded_build(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=size,
            in_channels=4,
            out_channels=4,
            down_block_types=SD1_DOWN_BLOCKS,
            up_block_types=SD1_UP_BLOCKS,
            block_out_channels=channels,
            layers_per_block=2,
            # diffusers' SD configs call the head *count* `attention_head_dim`.
            attention_head_dim=heads,
            cross_attention_dim=text_width,
            norm_num_groups=groups,
        ).eval(),
    )


def sd_sized_unet(seed: int = 0) -> UNet2DConditionModel:
    """The full SD 1.x UNet (about 860M parameters) with random weights, for GPU timing."""
    return _sd1_unet(
        seed, channels=(320, 640, 1280, 1280), heads=8, text_width=768, groups=32, size=64
    )


def _tiny_unet(seed: int) -> UNet2DConditionModel:
    return _sd1_unet(
        seed,
        channels=(32, 32, 64, 64),
        heads=2,
        text_width=TINY_TEXT_HIDDEN_SIZE,
        groups=8,
        size=16,
    )


def _tiny_vae(seed: int) -> AutoencoderKL:
    return _seeded_build(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.18215,
        ).eval(),
    )


def _tiny_text_encoder(seed: int, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TINY_TEXT_HIDDEN_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded_build(seed, lambda: CLIPTextModel(config).eval())


def _tiny_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer(Path(folder))
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def sd1_scheduler(prediction_type: str = "epsilon") -> PNDMScheduler:
    """The scheduler SD 1.4/1.5 ship (PNDM); loaders must turn it into DDIM (DESIGN 3.2)."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler of a tiny SD 1.x-shaped model."""
    tokenizer = _tiny_tokenizer()
    return {
        "unet": _tiny_unet(seed),
        "vae": _tiny_vae(seed + 1),
        "text_encoder": _tiny_text_encoder(seed + 2, tokenizer),
        "tokenizer": tokenizer,
        "scheduler": sd1_scheduler(prediction_type),
    }


def save_tiny_model(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save a tiny model as a diffusers folder, the same layout a real SD 1.x download has."""
    pipeline = StableDiffusionPipeline(
        **tiny_components(seed, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return Path(folder)


# --- diffusers -> original (LDM / CompVis) single-file checkpoint --------------------------
# A compact inverse of diffusers' single-file conversion, so tests can check that a
# `.safetensors`/`.ckpt` checkpoint loads to the same numbers as the diffusers folder.

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _rename_resnet_part(rest: str) -> str:
    part, _, tail = rest.partition(".")
    return f"{_UNET_RESNET_PARTS.get(part, part)}.{tail}"


def _unet_key_to_ldm(key: str, unet: UNet2DConditionModel) -> str:
    """Map one diffusers UNet key to its LDM name (input_blocks / middle_block / output_blocks)."""
    group = unet.config.layers_per_block + 1
    for prefix, ldm_prefix in _UNET_TOP_LEVEL.items():
        if key.startswith(prefix):
            return ldm_prefix + key.removeprefix(prefix)
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * group + layer + 1
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename_resnet_part(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(match[1]) + 1) * group}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename_resnet_part(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * group + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename_resnet_part(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        block = int(match[1])
        slot = 2 if hasattr(unet.up_blocks[block], "attentions") else 1
        return f"output_blocks.{block * group + group - 1}.{slot}.{match[2]}"
    raise ValueError(f"no LDM name for UNet key {key}")


def _vae_key_to_ldm(key: str, levels: int) -> str:
    """Map one diffusers VAE key to its LDM name (decoder levels are numbered in reverse)."""
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(
        r"up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
        lambda m: f"up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
        key,
    )
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if match := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{match[1]}.mid.attn_1.{_VAE_ATTENTION_PARTS[match[2]]}.{match[3]}"
    return key


def _ldm_vae_tensor(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers."""
    if ".mid.attn_1." in ldm_key and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def ldm_state_dict(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, torch.Tensor]:
    """The state dict of an original SD 1.x checkpoint holding these three components."""
    state = {}
    for key, tensor in unet.state_dict().items():
        state["model.diffusion_model." + _unet_key_to_ldm(key, unet)] = tensor
    levels = len(vae.config.block_out_channels)
    for key, tensor in vae.state_dict().items():
        ldm_key = _vae_key_to_ldm(key, levels)
        state["first_stage_model." + ldm_key] = _ldm_vae_tensor(ldm_key, tensor)
    for key, tensor in text_encoder.state_dict().items():
        bare_key = key.removeprefix("text_model.")
        state["cond_stage_model.transformer.text_model." + bare_key] = tensor
    return {key: tensor.contiguous() for key, tensor in state.items()}


def save_ldm_checkpoint(model_folder: Path, file: Path) -> Path:
    """Write the weights of a diffusers SD 1.x folder as one `.safetensors` or `.ckpt` file."""
    state = ldm_state_dict(
        UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet"),
        AutoencoderKL.from_pretrained(model_folder, subfolder="vae"),
        CLIPTextModel.from_pretrained(model_folder, subfolder="text_encoder"),
    )
    file = Path(file)
    if file.suffix == ".ckpt":
        torch.save({"state_dict": state}, file)
    else:
        save_file(state, file)
    return file
