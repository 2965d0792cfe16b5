"""Prompts as CLIP tokens, and how edit tokens borrow the source prompt's attention maps.

Everything here follows DESIGN.md sections 3.2, 3.5 and 3.6 to the letter: word splitting,
token positions and the replace/refine mappings decide which attention map goes where, so
two implementations must agree on them token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fatezero_cli.config import check_fraction
from fatezero_cli.errors import FatezeroError

if TYPE_CHECKING:
    from transformers import CLIPTextModel, PreTrainedTokenizerBase

MAX_TOKENS = 77

MATCH_SCORE = 1
MISMATCH_SCORE = -1
GAP_SCORE = 0


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids with start and end tokens, refusing rather than truncating long prompts.

    Truncation would silently drop words whose positions the edit relies on.
    """
    ids = list(tokenizer(prompt, verbose=False).input_ids)
    if len(ids) > MAX_TOKENS:
        preview = prompt if len(prompt) <= 40 else prompt[:40] + "..."
        raise FatezeroError(
            f"prompt is {len(ids)} tokens long; the limit is {MAX_TOKENS} "
            f"(start and end tokens included): shorten {preview!r}"
        )
    return ids


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: CLIPTextModel,
    prompts: list[str],
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Text embeddings [len(prompts), 77, D], padded as Stable Diffusion was trained."""
    for prompt in prompts:
        prompt_token_ids(tokenizer, prompt)
    ids = tokenizer(
        prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt"
    ).input_ids
    with torch.no_grad():  # embeddings are constants of an edit, never trained
        hidden = text_encoder(ids.to(device)).last_hidden_state
    return hidden.to(dtype)


def words(prompt: str) -> list[str]:
    """Single-space splitting, so that word k is the same word in every implementation."""
    return prompt.split(" ")


def word_token_ids(tokenizer: PreTrainedTokenizerBase, word: str) -> list[int]:
    return list(tokenizer(word, add_special_tokens=False).input_ids)


def word_token_positions(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[list[int]]:
    """Per word, where its tokens sit in the 77-token sequence (the start token is position 0)."""
    prompt_token_ids(tokenizer, prompt)
    positions = []
    next_position = 1
    for word in words(prompt):
        count = len(word_token_ids(tokenizer, word))
        positions.append(list(range(next_position, next_position + count)))
        next_position += count
    return positions


def word_positions(tokenizer: PreTrainedTokenizerBase, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of `word`: a repeated word is edited everywhere."""
    found = [
        position
        for candidate, positions in zip(
            words(prompt), word_token_positions(tokenizer, prompt), strict=True
        )
        if candidate == word
        for position in positions
    ]
    if not found:
        raise FatezeroError(
            f"{word!r} is not a word of the prompt {prompt!r} (words are split on single spaces)"
        )
    return found


def blend_positions(
    tokenizer: PreTrainedTokenizerBase, prompt: str, blend_words: list[str]
) -> list[int]:
    """Source token positions whose cross-attention makes the blending mask (DESIGN 3.6)."""
    return sorted({p for word in blend_words for p in word_positions(tokenizer, prompt, word)})


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields elementwise is ambiguous
class TokenMapping:
    """fused[..., j] = alpha[j] * (src_maps @ matrix)[..., j] + (1 - alpha[j]) * edit_maps[..., j]

    One matrix covers replace and refine alike, so the attention code needs no branches.
    """

    matrix: torch.Tensor  # [77, 77]: matrix[i, j] is the weight of source token i in edit token j
    alpha: torch.Tensor  # [77] in {0, 1}: 1 takes the source maps, 0 keeps the edit's own map
    mode: str  # "replace" or "refine"

    def apply(self, src_maps: torch.Tensor, edit_maps: torch.Tensor) -> torch.Tensor:
        """Fuse cross-attention probabilities over their last (token) dimension."""
        matrix = self.matrix.to(src_maps)
        alpha = self.alpha.to(src_maps)
        return alpha * (src_maps @ matrix) + (1 - alpha) * edit_maps


def replace_mapping(tokenizer: PreTrainedTokenizerBase, source: str, edit: str) -> TokenMapping:
    """Word k of the edit takes word k of the source (DESIGN 3.5, replace).

    After the last word, source and edit positions advance together with the offset the
    words left; this deliberately differs from Prompt-to-Prompt's code, which maps j to j.
    """
    source_words = word_token_positions(tokenizer, source)
    edit_words = word_token_positions(tokenizer, edit)
    if len(source_words) != len(edit_words):
        raise FatezeroError(
            f"replace needs prompts with the same number of words: {source!r} has "
            f"{len(source_words)}, {edit!r} has {len(edit_words)}"
        )
    matrix = torch.zeros(MAX_TOKENS, MAX_TOKENS)
    alpha = torch.ones(MAX_TOKENS)
    matrix[0, 0] = 1.0
    for source_positions, edit_positions in zip(source_words, edit_words, strict=True):
        if len(source_positions) == len(edit_positions):
            matrix[source_positions, edit_positions] = 1.0
        elif not source_positions:
            # An empty source word (two spaces in a row) has no map to give: the page is
            # silent here, and keeping the edit's own map beats an all-zero one.
            alpha[edit_positions] = 0.0
        else:
            rows = torch.tensor(source_positions)[:, None]
            matrix[rows, edit_positions] = 1.0 / len(edit_positions)
    source_next = 1 + sum(len(positions) for positions in source_words)
    edit_next = 1 + sum(len(positions) for positions in edit_words)
    for edit_position in range(edit_next, MAX_TOKENS):
        source_position = source_next + edit_position - edit_next
        if source_position < MAX_TOKENS:
            matrix[source_position, edit_position] = 1.0
        else:
            alpha[edit_position] = 0.0
    return TokenMapping(matrix=matrix, alpha=alpha, mode="replace")


def refine_mapping(tokenizer: PreTrainedTokenizerBase, source: str, edit: str) -> TokenMapping:
    """Edit tokens aligned to source tokens take their maps; inserted tokens keep their own."""
    source_ids = prompt_token_ids(tokenizer, source)
    edit_ids = prompt_token_ids(tokenizer, edit)
    matrix = torch.zeros(MAX_TOKENS, MAX_TOKENS)
    alpha = torch.ones(MAX_TOKENS)
    for edit_position, source_position in enumerate(aligned_source_positions(source_ids, edit_ids)):
        if source_position is None:
            alpha[edit_position] = 0.0
        else:
            matrix[source_position, edit_position] = 1.0
    for position in range(len(edit_ids), MAX_TOKENS):
        matrix[position, position] = 1.0
    return TokenMapping(matrix=matrix, alpha=alpha, mode="refine")


def aligned_source_positions(source_ids: list[int], edit_ids: list[int]) -> list[int | None]:
    """Per edit token, the source position it is aligned to, or None for a gap.

    Global (Needleman-Wunsch) alignment exactly as Prompt-to-Prompt's seq_aligner, ties
    included: a gap in the source first, then a gap in the edit, then the diagonal.
    """
    gap_in_source, gap_in_edit, diagonal = "left", "up", "diagonal"
    rows, columns = len(source_ids) + 1, len(edit_ids) + 1
    score = [[0] * columns for _ in range(rows)]
    move = [[gap_in_edit] * columns for _ in range(rows)]
    for j in range(columns):
        score[0][j] = j * GAP_SCORE
        move[0][j] = gap_in_source
    for i in range(rows):
        score[i][0] = i * GAP_SCORE
    for i in range(1, rows):
        for j in range(1, columns):
            same = source_ids[i - 1] == edit_ids[j - 1]
            candidates = {
                gap_in_source: score[i][j - 1] + GAP_SCORE,
                gap_in_edit: score[i - 1][j] + GAP_SCORE,
                diagonal: score[i - 1][j - 1] + (MATCH_SCORE if same else MISMATCH_SCORE),
            }
            move[i][j] = max(candidates, key=candidates.__getitem__)  # first maximum wins ties
            score[i][j] = candidates[move[i][j]]
    partners: list[int | None] = [None] * len(edit_ids)
    i, j = len(source_ids), len(edit_ids)
    while i > 0 or j > 0:
        if move[i][j] == diagonal:
            i, j = i - 1, j - 1
            partners[j] = i
        elif move[i][j] == gap_in_source:
            j -= 1
        else:
            i -= 1
    return partners


def token_mapping(tokenizer: PreTrainedTokenizerBase, source: str, edit: str) -> TokenMapping:
    """Replace when the prompts have the same number of words, refine otherwise (DESIGN 3.5)."""
    if len(words(source)) == len(words(edit)):
        return replace_mapping(tokenizer, source, edit)
    return refine_mapping(tokenizer, source, edit)


def reweight_vector(
    tokenizer: PreTrainedTokenizerBase, edit: str, factors: dict[str, float]
) -> torch.Tensor:
    """Per edit token, the equalizer factor for its fused attention (1 where no word asks)."""
    vector = torch.ones(MAX_TOKENS)
    for word, factor in factors.items():
        vector[word_positions(tokenizer, edit, word)] = factor
    return vector


def word_window_vector(
    tokenizer: PreTrainedTokenizerBase, edit: str, default: float, per_word: dict[str, float]
) -> torch.Tensor:
    """Per edit token, the fraction of steps its cross-attention is replaced.

    float64, so each fraction reads back as the decimal the user wrote.
    """
    check_fraction(default, "--cross-replace")
    for word, fraction in per_word.items():
        check_fraction(fraction, f"--cross-replace-word {word}")
    vector = torch.full((MAX_TOKENS,), float(default), dtype=torch.float64)
    for word, fraction in per_word.items():
        vector[word_positions(tokenizer, edit, word)] = fraction
    return vector


def parse_word_values(items: list[str], option: str) -> dict[str, float]:
    """Turn command-line WORD=VALUE items into a mapping, naming the option on mistakes."""
    values: dict[str, float] = {}
    for item in items:
        word, equals, text = item.partition("=")
        value = finite_float(text)
        if not equals or not word or " " in word or value is None:
            raise FatezeroError(f"{option} expects WORD=VALUE, got {item!r}")
        if word in values:
            raise FatezeroError(f"{option} gives {word!r} more than once")
        values[word] = value
    return values


def finite_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
