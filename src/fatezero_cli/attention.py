"""Attention processors: spatial-temporal self-attention, capture and fusion.

Everything here plugs into diffusers through `unet.set_attn_processor`, so the
UNet itself is never patched. Three roles share one set of kernels:

- `SpatialTemporalAttnProcessor` / `CrossAttnProcessor`: plain attention, with
  each frame's self-attention reading the keys of its key frames (DESIGN 3.3);
- `CaptureProcessor`: records the attention inputs during inversion
  (DESIGN 3.4); the maps are recomputed from them at replay;
- `FusedSelfAttnProcessor` / `FusedCrossAttnProcessor`: fuse the recorded
  source attention into the edit (DESIGN 3.5, 3.7), conditional half only.

Batches are laid out as diffusers' pipelines do: `[copy 0 frames, copy 1
frames, ...]`, with classifier-free guidance as `[uncond, cond]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from fatezero_cli.errors import FatezeroError

KEY_FRAME_NAMES = ("self", "mid", "first", "previous")


@dataclass(frozen=True)
class KeyFrames:
    """Which frames' keys and values each frame's self-attention reads (DESIGN 3.3)."""

    names: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str) -> KeyFrames:
        names = tuple(part.strip() for part in spec.split(",") if part.strip())
        unknown = [name for name in names if name not in KEY_FRAME_NAMES]
        if not names or unknown:
            raise FatezeroError(
                f"--key-frames {spec!r}: expected a comma-separated list of "
                f"{', '.join(KEY_FRAME_NAMES)} (e.g. 'self,mid')"
            )
        return cls(tuple(dict.fromkeys(names)))

    @property
    def spec(self) -> str:
        return ",".join(self.names)

    def frames_for(self, frame: int, num_frames: int) -> tuple[int, ...]:
        """Key frames of `frame`, each once, so every key token enters the softmax once."""
        picks = {
            "self": frame,
            "mid": (num_frames - 1) // 2,
            "first": 0,
            "previous": max(frame - 1, 0),
        }
        return tuple(dict.fromkeys(picks[name] for name in self.names))

    def groups(self, num_frames: int) -> list[KeyFrameGroup]:
        """Frames grouped by key-frame count, so each group is one batched kernel call."""
        by_length: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for frame in range(num_frames):
            keys = self.frames_for(frame, num_frames)
            by_length.setdefault(len(keys), []).append((frame, keys))
        return [
            KeyFrameGroup(
                queries=torch.tensor([frame for frame, _ in members]),
                keys=torch.tensor([keys for _, keys in members]),
            )
            for members in by_length.values()
        ]


@dataclass(frozen=True)
class KeyFrameGroup:
    queries: torch.Tensor  # [n] frame indices
    keys: torch.Tensor  # [n, L] key frame indices per query frame


SELF_ONLY = KeyFrames(("self",))


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of the UNet and where it sits on the latent grid."""

    name: str
    kind: str  # "self" (attn1) or "cross" (attn2)
    downscale: int  # the layer's token grid is the latent grid divided by this

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // self.downscale, latent_hw[1] // self.downscale

    @property
    def fused_by_default(self) -> bool:
        """Layers of at most (H/16)x(W/16) tokens, as the original (DESIGN 3.5)."""
        return self.downscale >= 2

    @property
    def feeds_mask(self) -> bool:
        """Cross-attention at 1/4 of the latent resolution makes the blend mask (DESIGN 3.6)."""
        return self.kind == "cross" and self.downscale == 4


_LAYER_NAME = re.compile(r"^(down_blocks|up_blocks|mid_block)\.?(\d*)\..*\.(attn[12])$")


def attention_layers(unet: torch.nn.Module) -> list[AttentionLayer]:
    """The UNet's transformer attention layers, in forward order, with their grid scale."""
    levels = len(unet.down_blocks)
    layers = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        match = _LAYER_NAME.match(name)
        if match is None:
            raise FatezeroError(f"unsupported UNet: unexpected attention layer {name}")
        block, index, which = match.groups()
        if block == "down_blocks":
            downscale = 2 ** int(index)
        elif block == "up_blocks":
            downscale = 2 ** (levels - 1 - int(index))
        else:
            downscale = 2 ** (levels - 1)
        layers.append(AttentionLayer(name, "self" if which == "attn1" else "cross", downscale))
    return layers


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads*d] -> [B, heads, N, d]."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads*d]."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def _xformers_ops():
    try:
        import xformers.ops  # type: ignore[import-not-found]
    except ImportError:
        return None
    return xformers.ops


@dataclass
class AttentionBackend:
    """The kernel that runs attention when no map is needed: SDPA, or xformers on CUDA."""

    name: str = "sdpa"

    @classmethod
    def choose(cls, requested: str, device: torch.device) -> AttentionBackend:
        if requested not in ("auto", "sdpa", "xformers"):
            raise FatezeroError(f"--attention {requested!r}: expected auto, sdpa or xformers")
        has_xformers = device.type == "cuda" and _xformers_ops() is not None
        if requested == "xformers" and not has_xformers:
            raise FatezeroError("--attention xformers needs CUDA and the xformers package")
        if requested == "auto":
            return cls("xformers" if has_xformers else "sdpa")
        return cls(requested)

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention over [B, heads, N, d] tensors."""
        if self.name == "xformers":
            out = _xformers_ops().memory_efficient_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale
            )
            return out.transpose(1, 2)
        return F.scaled_dot_product_attention(query, key, value, scale=scale)


def gather_key_frames(tensor: torch.Tensor, group: KeyFrameGroup, num_frames: int) -> torch.Tensor:
    """[B*F, h, N, d] -> [B*n, h, L*N, d]: each query frame's key frames along the token axis."""
    per_copy = tensor.unflatten(0, (-1, num_frames))  # [B, F, h, N, d]
    picked = per_copy[:, group.keys]  # [B, n, L, h, N, d]
    picked = picked.permute(0, 1, 3, 2, 4, 5)  # [B, n, h, L, N, d]
    return picked.flatten(3, 4).flatten(0, 1)


def gather_query_frames(
    tensor: torch.Tensor, group: KeyFrameGroup, num_frames: int
) -> torch.Tensor:
    """[B*F, h, N, d] -> [B*n, h, N, d]: the query frames of one group."""
    return tensor.unflatten(0, (-1, num_frames))[:, group.queries].flatten(0, 1)


def spatial_temporal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_frames: KeyFrames,
    num_frames: int,
    scale: float,
    backend: AttentionBackend,
) -> torch.Tensor:
    """Self-attention where frame i reads the keys/values of its key frames (DESIGN 3.3)."""
    out = torch.empty_like(query)
    per_copy_out = out.unflatten(0, (-1, num_frames))
    for group in key_frames.groups(num_frames):
        attended = backend(
            gather_query_frames(query, group, num_frames),
            gather_key_frames(key, group, num_frames),
            gather_key_frames(value, group, num_frames),
            scale,
        )
        per_copy_out[:, group.queries] = attended.unflatten(0, (-1, len(group.queries)))
    return out


def self_attention_probs(
    attn: Attention, hidden: torch.Tensor, key_frames: KeyFrames
) -> list[torch.Tensor]:
    """Per frame, softmax(QK^T / sqrt(d)) over its key frames' tokens: [heads, N, L*N].

    Used to replay what the inversion saw from its recorded inputs; key tokens
    are ordered as `key_frames.frames_for` lists the frames.
    """
    num_frames = hidden.shape[0]
    query = split_heads(attn.to_q(hidden), attn.heads)
    key = split_heads(attn.to_k(hidden), attn.heads)
    maps = []
    for frame in range(num_frames):
        keys = key[list(key_frames.frames_for(frame, num_frames))]  # [L, h, N, d]
        keys = keys.permute(1, 0, 2, 3).flatten(1, 2)  # [h, L*N, d]
        scores = query[frame].float() @ keys.float().transpose(-1, -2) * attn.scale
        maps.append(scores.softmax(dim=-1))
    return maps


def cross_attention_probs(
    attn: Attention, hidden: torch.Tensor, text_embeddings: torch.Tensor
) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) over the text tokens, in fp32: [B, heads, N, 77]."""
    query = split_heads(attn.to_q(hidden), attn.heads)
    key = split_heads(attn.to_k(text_embeddings), attn.heads)
    if key.shape[0] != query.shape[0]:
        key = key.expand(query.shape[0], -1, -1, -1)
    scores = query.float() @ key.float().transpose(-1, -2) * attn.scale
    return scores.softmax(dim=-1)


def _check_plain_attention(attn: Attention) -> None:
    """Our processors cover the SD 1.x transformer attention; refuse anything fancier."""
    if (
        attn.spatial_norm is not None
        or attn.group_norm is not None
        or attn.residual_connection
        or attn.rescale_output_factor != 1.0
        or attn.norm_q is not None
        or attn.norm_k is not None
    ):
        raise FatezeroError("unsupported UNet: attention layers with extra normalisation")


def _project_out(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](merge_heads(out)))


@dataclass
class VideoFrames:
    """What every processor of one UNet needs to know about the frame batch."""

    num_frames: int
    key_frames: KeyFrames
    backend: AttentionBackend = field(default_factory=AttentionBackend)
    key_frame_min_channels: int = 0

    def key_frames_for(self, attn: Attention) -> KeyFrames:
        """Layers narrower than the threshold attend within their own frame (DESIGN 3.3)."""
        if attn.to_q.in_features < self.key_frame_min_channels:
            return SELF_ONLY
        return self.key_frames


class SpatialTemporalAttnProcessor:
    """attn1 with keys and values from each frame's key frames."""

    def __init__(self, frames: VideoFrames) -> None:
        self.frames = frames

    def qkv(self, attn: Attention, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(
            split_heads(project(hidden), attn.heads)
            for project in (attn.to_q, attn.to_k, attn.to_v)
        )

    def attend(
        self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        return spatial_temporal_attention(
            query,
            key,
            value,
            self.frames.key_frames_for(attn),
            self.frames.num_frames,
            attn.scale,
            self.frames.backend,
        )

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, **_
    ) -> torch.Tensor:
        _check_plain_attention(attn)
        return _project_out(attn, self.attend(attn, *self.qkv(attn, hidden_states)))


class CrossAttnProcessor:
    """attn2, plain: each frame reads the text tokens."""

    def __init__(self, frames: VideoFrames) -> None:
        self.frames = frames

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, **_
    ) -> torch.Tensor:
        _check_plain_attention(attn)
        query = split_heads(attn.to_q(hidden_states), attn.heads)
        key = split_heads(attn.to_k(encoder_hidden_states), attn.heads)
        value = split_heads(attn.to_v(encoder_hidden_states), attn.heads)
        return _project_out(attn, self.frames.backend(query, key, value, attn.scale))


class CaptureProcessor:
    """Records a layer's input (the normalised hidden states) before running it.

    Storing inputs instead of maps is many times smaller, and replay
    recomputes the maps exactly from them (DESIGN 3.4).
    """

    def __init__(self, inner, name: str, recorder: StepRecorder) -> None:
        self.inner = inner
        self.name = name
        self.recorder = recorder

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs):
        self.recorder.record(self.name, hidden_states)
        return self.inner(attn, hidden_states, *args, **kwargs)


@dataclass
class StepRecorder:
    """Collects one inversion step's attention inputs, when that step is captured."""

    active: bool = False
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(self, name: str, hidden: torch.Tensor) -> None:
        if self.active:
            self.tensors[name] = hidden.detach().to("cpu", copy=True).contiguous()

    def start(self, active: bool) -> None:
        self.active = active
        self.tensors = {}


def plain_processors(unet: torch.nn.Module, frames: VideoFrames) -> dict[str, object]:
    """Processors for plain spatial-temporal attention in every layer."""
    return {
        f"{layer.name}.processor": (
            SpatialTemporalAttnProcessor(frames)
            if layer.kind == "self"
            else CrossAttnProcessor(frames)
        )
        for layer in attention_layers(unet)
    }


def capture_processors(
    unet: torch.nn.Module, frames: VideoFrames, layers: set[str], recorder: StepRecorder
) -> dict[str, object]:
    """Plain processors, wrapped to record the inputs of `layers`."""
    processors = plain_processors(unet, frames)
    for layer in attention_layers(unet):
        if layer.name in layers:
            key = f"{layer.name}.processor"
            processors[key] = CaptureProcessor(processors[key], layer.name, recorder)
    return processors


@dataclass
class FusionStep:
    """The state of one edit step, shared by every fused processor.

    `source` holds the inversion's recorded inputs at this timestep; `masks`
    maps a layer grid (h, w) to the per-frame, per-token blend mask [F, N],
    or is None when there are no blend words (pure source self-attention).
    """

    source: dict[str, torch.Tensor] = field(default_factory=dict)
    self_replace: bool = False
    cross_window: torch.Tensor | None = None  # [77] 1 where the token's window is open
    masks: dict[tuple[int, int], torch.Tensor] | None = None


@dataclass
class FusionPlan:
    """What stays fixed over an edit: prompts' mapping, source text, fused layers."""

    source_text: torch.Tensor  # [1, 77, D] source prompt embedding
    mapping: object  # prompts.TokenMapping
    fused_layers: set[str]
    latent_hw: tuple[int, int]
    reweight: torch.Tensor | None = None  # [77] equalizer factors per edit token
    step: FusionStep = field(default_factory=FusionStep)
    edit_word_positions: list[int] = field(default_factory=list)
    accumulate_edit_maps: bool = False
    edit_maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def source_hidden(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.step.source[name].to(device=like.device, dtype=like.dtype)

    def mask_for(self, layer: AttentionLayer, like: torch.Tensor) -> torch.Tensor | None:
        """[F, 1, N, 1] mask selecting query rows, or None when no blend words were given."""
        if self.step.masks is None:
            return None
        mask = self.step.masks[layer.grid(self.latent_hw)]
        return mask.to(device=like.device, dtype=like.dtype)[:, None, :, None]


class FusedSelfAttnProcessor(SpatialTemporalAttnProcessor):
    """Self-attention fusion: s = M * s_edit + (1 - M) * s_src on the cond half (DESIGN 3.7).

    M selects query rows, so the fused output is a row-wise mix of two
    attention outputs and no map is ever materialised.
    """

    def __init__(self, frames: VideoFrames, plan: FusionPlan, layer: AttentionLayer) -> None:
        super().__init__(frames)
        self.plan = plan
        self.layer = layer

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, **_
    ) -> torch.Tensor:
        if not self.plan.step.self_replace:
            return super().__call__(attn, hidden_states)
        _check_plain_attention(attn)
        query, key, value = self.qkv(attn, hidden_states)
        num_frames = self.frames.num_frames
        source = self.plan.source_hidden(self.layer.name, hidden_states)
        src_query, src_key, _ = self.qkv(attn, source)
        cond_value = value[num_frames:]
        mask = self.plan.mask_for(self.layer, hidden_states)
        if mask is None:
            out = self.attend(
                attn,
                torch.cat([query[:num_frames], src_query]),
                torch.cat([key[:num_frames], src_key]),
                torch.cat([value[:num_frames], cond_value]),
            )
            return _project_out(attn, out)
        out = self.attend(
            attn,
            torch.cat([query, src_query]),
            torch.cat([key, src_key]),
            torch.cat([value, cond_value]),
        )
        uncond, edit, source = out.split(num_frames)
        return _project_out(attn, torch.cat([uncond, mask * edit + (1 - mask) * source]))


class FusedCrossAttnProcessor(CrossAttnProcessor):
    """Prompt-to-Prompt on the inversion's maps for the cond half (DESIGN 3.5).

    Maps are materialised only for the cond half while a token's window is
    open, or when latent blending needs the edit's own maps.
    """

    def __init__(self, frames: VideoFrames, plan: FusionPlan, name: str, layer: AttentionLayer):
        super().__init__(frames)
        self.plan = plan
        self.name = name
        self.fuses = name in plan.fused_layers
        self.records_edit_maps = layer.feeds_mask and plan.accumulate_edit_maps

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, **_
    ) -> torch.Tensor:
        window = self.plan.step.cross_window
        fusing = self.fuses and window is not None and bool(window.any())
        if not fusing and not self.records_edit_maps:
            return super().__call__(attn, hidden_states, encoder_hidden_states)
        _check_plain_attention(attn)
        num_frames = self.frames.num_frames
        query = split_heads(attn.to_q(hidden_states), attn.heads)
        key = split_heads(attn.to_k(encoder_hidden_states), attn.heads)
        value = split_heads(attn.to_v(encoder_hidden_states), attn.heads)
        uncond = self.frames.backend(
            query[:num_frames], key[:num_frames], value[:num_frames], attn.scale
        )
        scores = query[num_frames:].float() @ key[num_frames:].float().transpose(-1, -2)
        edit_maps = (scores * attn.scale).softmax(dim=-1)
        if self.records_edit_maps:
            self._accumulate(edit_maps)
        maps = self._fuse(attn, hidden_states, edit_maps, window) if fusing else edit_maps
        cond = maps.to(value.dtype) @ value[num_frames:]
        return _project_out(attn, torch.cat([uncond, cond]))

    def _fuse(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        edit_maps: torch.Tensor,
        window: torch.Tensor,
    ) -> torch.Tensor:
        source = self.plan.source_hidden(self.name, hidden_states)
        text = self.plan.source_text.to(device=source.device, dtype=source.dtype)
        source_maps = cross_attention_probs(attn, source, text)
        window = window.to(edit_maps.device, edit_maps.dtype)
        mapped = self.plan.mapping.apply(source_maps, edit_maps)
        if self.plan.reweight is not None:  # equalizer: after replace/refine, in the window
            mapped = mapped * self.plan.reweight.to(mapped.device, mapped.dtype)
        return window * mapped + (1 - window) * edit_maps

    def _accumulate(self, edit_maps: torch.Tensor) -> None:
        """Sum the edit words' maps over steps, for the latent-blend mask (DESIGN 3.8)."""
        words = edit_maps[..., self.plan.edit_word_positions].sum(dim=-1).mean(dim=1)  # [F, N]
        previous = self.plan.edit_maps.get(self.name)
        self.plan.edit_maps[self.name] = words if previous is None else previous + words


def fusion_processors(
    unet: torch.nn.Module, frames: VideoFrames, plan: FusionPlan
) -> dict[str, object]:
    """Fused processors in the fused layers, plain ones elsewhere."""
    processors = plain_processors(unet, frames)
    for layer in attention_layers(unet):
        key = f"{layer.name}.processor"
        if layer.name in plan.fused_layers and layer.kind == "self":
            processors[key] = FusedSelfAttnProcessor(frames, plan, layer)
        elif layer.name in plan.fused_layers or (layer.feeds_mask and plan.accumulate_edit_maps):
            processors[key] = FusedCrossAttnProcessor(frames, plan, layer.name, layer)
    return processors
