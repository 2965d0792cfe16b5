"""A tiny CLIP tokenizer written to a folder, so tests can tokenise prompts without downloads.

It mimics the real CLIP vocabulary's shape: every byte-level character bare and with the
end-of-word suffix, merges that make chosen words single tokens, and the two special tokens
last. Words outside the chosen list fall apart into several tokens, which is exactly what
tests of multi-token words need.
"""

import json
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from tokenizers.pre_tokenizers import ByteLevel

END_OF_WORD = "</w>"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

DEFAULT_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        " ".join(
            [
                "a black swan with a red beak swimming in a river near a wall and bushes",
                "a white duck with a yellow beak",
                "a pink flamingo",
                "a silver jeep driving down a curvy road in the countryside",
                "watercolor painting of",
                "a brown bear walking on the rock against a wall",
                "a red tiger",
                "a rabbit is eating a watermelon",
                "pokemon cartoon of",
            ]
        ).split()
    )
)


def write_tiny_tokenizer(folder: Path, words: Iterable[str] = DEFAULT_WORDS) -> None:
    """Write vocab.json, merges.txt and the configs that `CLIPTokenizer.from_pretrained` reads."""
    merges = merges_making_single_tokens(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocabulary(merges)), encoding="utf-8")
    merge_lines = "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    special_tokens = {
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": END_TOKEN,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens), encoding="utf-8")
    # Without model_max_length the loaded tokenizer would believe its context is unbounded.
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special_tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Special tokens come last, as in CLIP, where the end token has the highest id."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [char + END_OF_WORD for char in alphabet]
    tokens += [left + right for left, right in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def merges_making_single_tokens(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges under which each word is one token.

    A word's merges are appended after all earlier ones, so they only act once the earlier
    merges are exhausted: words made single tokens before stay single tokens.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        if not (word.isascii() and word.isalpha() and word.islower()):
            raise ValueError(f"tiny tokenizer words must be lowercase ASCII letters, got {word!r}")
        pieces = apply_merges(word_symbols(word), merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return merges


def word_symbols(word: str) -> list[str]:
    return [*word[:-1], word[-1] + END_OF_WORD]


def apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding as the tokenizers library does it: lowest-ranked adjacent pair first."""
    rank = {pair: index for index, pair in enumerate(merges)}
    while True:
        pairs = [(rank.get(pair, len(rank)), i) for i, pair in enumerate(pairwise(symbols))]
        best_rank, i = min(pairs, default=(len(rank), -1))
        if best_rank == len(rank):
            return symbols
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
