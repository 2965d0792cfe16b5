"""Settings as data: one frozen dataclass per run, written beside every output.

Field names follow the CLI options; `ORIGINAL_KEYS` names the original
FateZero YAML keys they correspond to (DESIGN 3.10).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from fatezero_cli.errors import FatezeroError

# Latent blending runs between these fractions of the edit steps (DESIGN 3.8).
LATENT_BLEND_WINDOW = (0.2, 0.8)

ORIGINAL_KEYS = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "cross_replace": "cross_replace_steps.default_",
    "self_replace": "self_replace_steps",
    "blend_words": "blend_words",
    "tau": "blend_th",
    "reweight": "eq_params",
    "latent_blend": "blend_latents",
    "key_frames": "SparseCausalAttention_index",
    "frames": "n_sample_frame",
    "stride": "sampling_rate",
    "start": "start_sample_frame",
}


def window_steps(fraction: float, steps: int) -> int:
    """How many of the noisiest edit steps a window of `fraction` covers: floor(f * N).

    The fraction is taken as the decimal the user wrote (0.29 * 100 is 29,
    not the 28 that binary floating point would give).
    """
    return math.floor(Fraction(str(fraction)) * steps)


def check_fraction(value: float, option: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise FatezeroError(f"{option} must be between 0 and 1, got {value}")
    return value


@dataclass(frozen=True)
class InversionSettings:
    """Everything besides frames and model that changes what `invert` computes."""

    source_prompt: str
    steps: int = 50
    key_frames: str = "self,mid"
    key_frame_min_channels: int = 0
    capture: float = 0.8
    capture_all_layers: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.steps > 1000:
            raise FatezeroError(f"--steps must be between 1 and 1000, got {self.steps}")
        check_fraction(self.capture, "--capture")

    def captured_steps(self) -> int:
        return window_steps(self.capture, self.steps)


@dataclass(frozen=True)
class EditSettings:
    """One edit: the prompt and how strongly the source attention is kept."""

    prompt: str
    guidance: float = 7.5
    cross_replace: float = 0.8
    cross_replace_words: dict[str, float] = field(default_factory=dict)
    self_replace: float = 0.6
    blend_words: tuple[str, ...] = ()
    tau: float = 0.3
    reweight: dict[str, float] = field(default_factory=dict)
    latent_blend: bool = False
    fuse_all_layers: bool = False

    def __post_init__(self) -> None:
        check_fraction(self.cross_replace, "--cross-replace")
        check_fraction(self.self_replace, "--self-replace")
        check_fraction(self.tau, "--tau")
        for word, value in self.cross_replace_words.items():
            check_fraction(value, f"--cross-replace-word {word}")
        if self.latent_blend and not self.blend_words:
            raise FatezeroError("--latent-blend needs --blend WORDS (the mask it blends with)")

    def needed_capture(self) -> float:
        """The largest window this edit reads from the cache."""
        windows = [self.cross_replace, self.self_replace, *self.cross_replace_words.values()]
        if self.latent_blend and self.blend_words:
            windows.append(LATENT_BLEND_WINDOW[1])
        return max(windows)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["blend_words"] = list(self.blend_words)
        return data
