"""Token positions and attention mappings, worked by hand on a tiny offline CLIP tokenizer.

In the tiny vocabulary the prompt words of the examples are single tokens, while "crystal"
falls apart into its seven letters, which is how multi-token words are exercised.
"""

import random
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fatezero_cli.errors import FatezeroError
from fatezero_cli.prompts import (
    MAX_TOKENS,
    TokenMapping,
    aligned_source_positions,
    blend_positions,
    encode_prompts,
    parse_word_values,
    prompt_token_ids,
    refine_mapping,
    replace_mapping,
    reweight_vector,
    token_mapping,
    word_positions,
    word_token_ids,
    word_token_positions,
    word_window_vector,
    words,
)
from fatezero_cli.testing_tokenizer import DEFAULT_WORDS, write_tiny_tokenizer

SWAN = "a black swan with a red beak swimming in a river near a wall and bushes"
CRYSTAL_TOKENS = 7


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def column(mapping: TokenMapping, j: int) -> dict[int, float]:
    """The non-zero weights of edit token j, by source position."""
    return {
        i: round(mapping.matrix[i, j].item(), 6)
        for i in mapping.matrix[:, j].nonzero()[:, 0].tolist()
    }


# --- the tiny tokenizer -------------------------------------------------------------------


def test_tiny_tokenizer_makes_default_words_single_tokens(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == MAX_TOKENS
    for word in DEFAULT_WORDS:
        assert len(word_token_ids(tokenizer, word)) == 1, word
    assert tokenizer.convert_ids_to_tokens(word_token_ids(tokenizer, "crystal")) == [
        *"crysta",
        "l</w>",
    ]
    for word in ["swarovski", "porsche"]:
        assert len(word_token_ids(tokenizer, word)) > 1


def test_tiny_tokenizer_loads_from_its_files_too(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    write_tiny_tokenizer(tmp_path)
    direct = CLIPTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77
    )
    prompt = "a crystal swan, near porsche 911!"
    assert direct(prompt).input_ids == tokenizer(prompt).input_ids
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # the highest id, as in CLIP


# --- tokens and words ---------------------------------------------------------------------


def test_words_split_on_single_spaces() -> None:
    assert words("a black  swan") == ["a", "black", "", "swan"]


def test_word_token_positions_of_single_token_words(tokenizer: CLIPTokenizer) -> None:
    assert word_token_positions(tokenizer, "a black swan") == [[1], [2], [3]]


def test_word_token_positions_of_a_multi_token_word(tokenizer: CLIPTokenizer) -> None:
    assert word_token_positions(tokenizer, "a crystal swan") == [[1], list(range(2, 9)), [9]]


@pytest.mark.parametrize(
    "prompt", [SWAN, "a crystal swan", "swarovski crystal, on a porsche", "a  black swan "]
)
def test_word_token_positions_agree_with_the_whole_prompt(
    tokenizer: CLIPTokenizer, prompt: str
) -> None:
    ids = prompt_token_ids(tokenizer, prompt)
    positions = word_token_positions(tokenizer, prompt)
    for word, word_positions_ in zip(words(prompt), positions, strict=True):
        assert [ids[p] for p in word_positions_] == word_token_ids(tokenizer, word)
    assert sum(len(p) for p in positions) == len(ids) - 2


def test_prompt_token_ids_include_start_and_end(tokenizer: CLIPTokenizer) -> None:
    ids = prompt_token_ids(tokenizer, "a swan")
    assert ids == [
        tokenizer.bos_token_id,
        *word_token_ids(tokenizer, "a swan"),
        tokenizer.eos_token_id,
    ]


def test_a_prompt_of_exactly_77_tokens_is_accepted(tokenizer: CLIPTokenizer) -> None:
    assert len(prompt_token_ids(tokenizer, " ".join(["swan"] * 75))) == 77


def test_a_prompt_over_77_tokens_is_refused_not_truncated(tokenizer: CLIPTokenizer) -> None:
    long_prompt = " ".join(["swan"] * 76)
    with pytest.raises(FatezeroError, match="prompt is 78 tokens long; the limit is 77"):
        prompt_token_ids(tokenizer, long_prompt)
    with pytest.raises(FatezeroError, match="78 tokens"):
        word_token_positions(tokenizer, long_prompt)


def test_encode_prompts_pads_to_77_and_uses_the_last_hidden_state(
    tokenizer: CLIPTokenizer,
) -> None:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    encoder = CLIPTextModel(config).eval()
    embeddings = encode_prompts(tokenizer, encoder, ["", "a black swan"], "cpu", torch.float64)
    assert embeddings.shape == (2, 77, 16)
    assert embeddings.dtype == torch.float64
    ids = prompt_token_ids(tokenizer, "a black swan")
    padded = torch.tensor([ids + [tokenizer.pad_token_id] * (77 - len(ids))])
    with torch.no_grad():
        expected = encoder(padded).last_hidden_state
    torch.testing.assert_close(embeddings[1:], expected.double())
    with pytest.raises(FatezeroError, match="78 tokens"):
        encode_prompts(tokenizer, encoder, [" ".join(["a"] * 76)], "cpu", torch.float32)


def test_word_positions_finds_every_occurrence(tokenizer: CLIPTokenizer) -> None:
    assert word_positions(tokenizer, SWAN, "a") == [1, 5, 10, 13]
    assert word_positions(tokenizer, "a crystal swan", "crystal") == list(range(2, 9))


def test_word_positions_of_an_absent_word_is_an_error(tokenizer: CLIPTokenizer) -> None:
    with pytest.raises(FatezeroError, match=r"'black swan' is not a word of the prompt 'a black"):
        word_positions(tokenizer, "a black swan", "black swan")


def test_blend_positions_are_sorted_and_unique(tokenizer: CLIPTokenizer) -> None:
    assert blend_positions(tokenizer, SWAN, ["swan", "a", "swan"]) == [1, 3, 5, 10, 13]
    assert blend_positions(tokenizer, "a crystal swan", ["crystal"]) == list(range(2, 9))


def test_blend_positions_name_the_absent_word_and_prompt(tokenizer: CLIPTokenizer) -> None:
    with pytest.raises(FatezeroError, match=r"'duck' is not a word of the prompt 'a black swan'"):
        blend_positions(tokenizer, "a black swan", ["swan", "duck"])


# --- replace --------------------------------------------------------------------------------


def test_replace_with_equal_token_counts_is_the_identity(tokenizer: CLIPTokenizer) -> None:
    mapping = replace_mapping(tokenizer, SWAN, SWAN.replace("black swan", "white duck"))
    assert mapping.mode == "replace"
    assert torch.equal(mapping.matrix, torch.eye(77))
    assert torch.equal(mapping.alpha, torch.ones(77))


def test_replace_with_a_longer_edit_word(tokenizer: CLIPTokenizer) -> None:
    # source: <s>0 a1 black2 swan3 </s>4 pad5...
    # edit:   <s>0 a1 c2 r3 y4 s5 t6 a7 l8 swan9 </s>10 pad11...
    mapping = replace_mapping(tokenizer, "a black swan", "a crystal swan")
    assert column(mapping, 0) == {0: 1.0}
    assert column(mapping, 1) == {1: 1.0}
    for j in range(2, 9):  # each crystal token: black's map shared out over seven tokens
        assert column(mapping, j) == {2: round(1 / 7, 6)}
    assert column(mapping, 9) == {3: 1.0}
    for j in range(10, 77):  # end token and padding keep pairing, six positions behind
        assert column(mapping, j) == {j - 6: 1.0}
    assert torch.equal(mapping.alpha, torch.ones(77))
    assert mapping.matrix[71:].sum() == 0  # the source's last padding has no partner


def test_replace_with_a_shorter_edit_word(tokenizer: CLIPTokenizer) -> None:
    # source: <s>0 a1 c2 r3 y4 s5 t6 a7 l8 swan9 </s>10 pad11...
    # edit:   <s>0 a1 black2 swan3 </s>4 pad5...
    mapping = replace_mapping(tokenizer, "a crystal swan", "a black swan")
    assert column(mapping, 0) == {0: 1.0}
    assert column(mapping, 1) == {1: 1.0}
    assert column(mapping, 2) == dict.fromkeys(range(2, 9), 1.0)  # the sum of crystal's maps
    assert column(mapping, 3) == {9: 1.0}
    for j in range(4, 71):
        assert column(mapping, j) == {j + 6: 1.0}
    for j in range(71, 77):  # source positions 77..82 do not exist: keep the edit's own map
        assert column(mapping, j) == {}
    assert mapping.alpha.tolist() == [1.0] * 71 + [0.0] * 6


def test_replace_splits_a_multi_token_source_word_over_several_edit_tokens(
    tokenizer: CLIPTokenizer,
) -> None:
    # "hat" is h a t</w>: three edit tokens share crystal's seven maps, a third each
    assert word_token_ids(tokenizer, "hat") == tokenizer.convert_tokens_to_ids(["h", "a", "t</w>"])
    mapping = replace_mapping(tokenizer, "a crystal swan", "a hat swan")
    for j in range(2, 5):
        assert column(mapping, j) == dict.fromkeys(range(2, 9), round(1 / 3, 6))
    assert column(mapping, 5) == {9: 1.0}
    assert column(mapping, 6) == {10: 1.0}
    assert mapping.alpha.tolist() == [1.0] * 73 + [0.0] * 4


def test_replace_keeps_the_edit_map_where_the_source_word_is_empty(
    tokenizer: CLIPTokenizer,
) -> None:
    mapping = replace_mapping(tokenizer, "a  swan", "a white swan")
    assert column(mapping, 2) == {}
    assert mapping.alpha[2] == 0
    assert column(mapping, 3) == {2: 1.0}
    assert column(mapping, 4) == {3: 1.0}
    assert mapping.alpha.tolist() == [1.0, 1.0, 0.0] + [1.0] * 74


def test_replace_needs_the_same_number_of_words(tokenizer: CLIPTokenizer) -> None:
    with pytest.raises(FatezeroError, match="same number of words"):
        replace_mapping(tokenizer, "a swan", "a white swan")


def test_token_mapping_replaces_when_word_counts_match(tokenizer: CLIPTokenizer) -> None:
    assert token_mapping(tokenizer, "a black swan", "a crystal swan").mode == "replace"
    assert token_mapping(tokenizer, "a swan", "a crystal swan").mode == "refine"


# --- refine ---------------------------------------------------------------------------------


def test_refine_with_words_appended(tokenizer: CLIPTokenizer) -> None:
    # source: <s>0 a1 black2 swan3 </s>4; edit: <s>0 a1 black2 swan3 with4 a5 red6 beak7 </s>8
    mapping = refine_mapping(tokenizer, "a black swan", "a black swan with a red beak")
    assert mapping.mode == "refine"
    for j in range(4):
        assert column(mapping, j) == {j: 1.0}
    for j in range(4, 8):  # inserted words, the second "a" included: no source partner
        assert column(mapping, j) == {}
    assert column(mapping, 8) == {4: 1.0}
    for j in range(9, 77):  # past the edit's end: the source map at the same position
        assert column(mapping, j) == {j: 1.0}
    assert mapping.alpha.tolist() == [1.0] * 4 + [0.0] * 4 + [1.0] * 69


def test_refine_with_a_word_inserted_in_the_middle(tokenizer: CLIPTokenizer) -> None:
    # source: <s>0 a1 swan2 </s>3; edit: <s>0 a1 white2 swan3 </s>4
    mapping = refine_mapping(tokenizer, "a swan", "a white swan")
    assert [column(mapping, j) for j in range(5)] == [{0: 1.0}, {1: 1.0}, {}, {2: 1.0}, {3: 1.0}]
    for j in range(5, 77):
        assert column(mapping, j) == {j: 1.0}
    assert mapping.alpha.tolist() == [1.0, 1.0, 0.0] + [1.0] * 74


def test_refine_with_a_multi_token_word_inserted(tokenizer: CLIPTokenizer) -> None:
    mapping = refine_mapping(tokenizer, "a swan", "a crystal swan")
    assert column(mapping, 9) == {2: 1.0}
    assert column(mapping, 10) == {3: 1.0}
    # crystal's "a" token is aligned to nothing: the prompt's "a" is matched first
    assert mapping.alpha.tolist() == [1.0, 1.0] + [0.0] * 7 + [1.0] * 68


def test_refine_tie_a_repeated_source_pair_is_matched_first(tokenizer: CLIPTokenizer) -> None:
    # source: <s>0 a1 swan2 a3 swan4 </s>5; edit: <s>0 a1 swan2 </s>3. Both "a swan" pairs
    # of the source score the same; tracing back from the end, the "up" move (skipping a
    # source token) beats the diagonal at (5, 3) and (4, 3), so the first pair is matched.
    mapping = refine_mapping(tokenizer, "a swan a swan", "a swan")
    assert [column(mapping, j) for j in range(4)] == [{0: 1.0}, {1: 1.0}, {2: 1.0}, {5: 1.0}]
    assert column(mapping, 4) == {4: 1.0}
    assert torch.equal(mapping.alpha, torch.ones(77))


def test_refine_tie_a_repeated_edit_pair_takes_the_first(tokenizer: CLIPTokenizer) -> None:
    # source: <s>0 a1 swan2 </s>3; edit: <s>0 a1 swan2 a3 swan4 </s>5. At (3, 5) the "left"
    # move (a gap in the source) ties the swan-swan diagonal and wins, so the second pair
    # of the edit is the inserted one.
    mapping = refine_mapping(tokenizer, "a swan", "a swan a swan")
    assert [column(mapping, j) for j in range(6)] == [
        {0: 1.0},
        {1: 1.0},
        {2: 1.0},
        {},
        {},
        {3: 1.0},
    ]
    assert mapping.alpha[:6].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_refine_never_aligns_a_mismatch(tokenizer: CLIPTokenizer) -> None:
    # With gap 0 a mismatch (-1) always loses to two gaps: "black" is not paired with "white".
    mapping = refine_mapping(tokenizer, "a black swan", "a white swan swimming")
    assert column(mapping, 2) == {}
    assert column(mapping, 3) == {3: 1.0}


def prompt_to_prompt_mapper(x: list[int], y: list[int], max_len: int = 77) -> tuple[list, list]:
    """Prompt-to-Prompt's seq_aligner.get_mapper, transcribed, as the reference."""
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    trace = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    trace[0] = [4] + [1] * len(y)
    for i in range(1, len(x) + 1):
        trace[i][0] = 2
        for j in range(1, len(y) + 1):
            left = score[i][j - 1]
            up = score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(left, up, diag)
            trace[i][j] = 1 if score[i][j] == left else 2 if score[i][j] == up else 3
    i, j, mapper_base = len(x), len(y), []
    while i > 0 or j > 0:
        if trace[i][j] == 3:
            i, j = i - 1, j - 1
            mapper_base.append((j, i))
        elif trace[i][j] == 1:
            j -= 1
            mapper_base.append((j, -1))
        elif trace[i][j] == 2:
            i -= 1
    mapper_base.reverse()
    mapper = [m for _, m in mapper_base] + [len(y) + k for k in range(max_len - len(y))]
    alphas = [float(m != -1) for _, m in mapper_base] + [1.0] * (max_len - len(y))
    return mapper, alphas


def test_alignment_matches_prompt_to_prompt_on_random_sequences() -> None:
    rng = random.Random(0)
    for _ in range(300):
        x = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        y = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        mapper, _ = prompt_to_prompt_mapper(x, y, max_len=len(y))
        expected = [None if m == -1 else m for m in mapper]
        assert aligned_source_positions(x, y) == expected, (x, y)


@pytest.mark.parametrize(
    ("source", "edit"),
    [(SWAN, "a white duck with a yellow beak swimming in a river"), ("a swan", SWAN)],
)
def test_refine_mapping_matches_prompt_to_prompt(
    tokenizer: CLIPTokenizer, source: str, edit: str
) -> None:
    mapping = refine_mapping(tokenizer, source, edit)
    mapper, alphas = prompt_to_prompt_mapper(
        prompt_token_ids(tokenizer, source), prompt_token_ids(tokenizer, edit)
    )
    assert mapping.alpha.tolist() == alphas
    for j, (i, alpha) in enumerate(zip(mapper, alphas, strict=True)):
        assert column(mapping, j) == ({i: 1.0} if alpha else {})


# --- applying a mapping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "edit"), [("a crystal swan", "a black swan"), ("a swan", "a white swan")]
)
def test_apply_matches_a_brute_force_loop(tokenizer: CLIPTokenizer, source: str, edit: str) -> None:
    mapping = token_mapping(tokenizer, source, edit)
    torch.manual_seed(0)
    src_maps = torch.rand(2, 5, 77, dtype=torch.float64)
    edit_maps = torch.rand(2, 5, 77, dtype=torch.float64)
    fused = mapping.apply(src_maps, edit_maps)
    assert fused.dtype == torch.float64
    expected = torch.empty_like(edit_maps)
    for j in range(77):
        borrowed = sum(mapping.matrix[i, j].item() * src_maps[..., i] for i in range(77))
        alpha = mapping.alpha[j].item()
        expected[..., j] = alpha * borrowed + (1 - alpha) * edit_maps[..., j]
    torch.testing.assert_close(fused, expected)


# --- reweighting and windows ------------------------------------------------------------------


def test_reweight_vector_scales_every_occurrence(tokenizer: CLIPTokenizer) -> None:
    vector = reweight_vector(tokenizer, SWAN, {"a": 2.0, "swan": 0.5})
    expected = torch.ones(77)
    expected[[1, 5, 10, 13]] = 2.0
    expected[3] = 0.5
    assert torch.equal(vector, expected)
    crystal = reweight_vector(tokenizer, "a crystal swan", {"crystal": 3.0})
    assert crystal.tolist() == [1.0, 1.0] + [3.0] * 7 + [1.0] * 68


def test_reweight_vector_refuses_an_absent_word(tokenizer: CLIPTokenizer) -> None:
    with pytest.raises(FatezeroError, match="'duck' is not a word"):
        reweight_vector(tokenizer, "a black swan", {"duck": 2.0})


def test_word_window_vector(tokenizer: CLIPTokenizer) -> None:
    vector = word_window_vector(tokenizer, "a crystal swan", 0.8, {"crystal": 0.2, "swan": 1.0})
    assert vector.tolist() == pytest.approx([0.8, 0.8] + [0.2] * 7 + [1.0] + [0.8] * 67)
    assert vector.dtype == torch.float64  # each fraction reads back as the decimal written


def test_word_window_vector_refuses_absent_words_and_bad_fractions(
    tokenizer: CLIPTokenizer,
) -> None:
    with pytest.raises(FatezeroError, match="'duck' is not a word"):
        word_window_vector(tokenizer, "a black swan", 0.8, {"duck": 0.5})
    with pytest.raises(
        FatezeroError, match=r"--cross-replace-word swan must be between 0 and 1, got 1\.5"
    ):
        word_window_vector(tokenizer, "a black swan", 0.8, {"swan": 1.5})
    with pytest.raises(FatezeroError, match=r"--cross-replace must be between 0 and 1, got -0\.1"):
        word_window_vector(tokenizer, "a black swan", -0.1, {})


# --- command-line word values ---------------------------------------------------------------


def test_parse_word_values() -> None:
    assert parse_word_values(["swan=2", "red=0.5", "beak=-1e-1"], "--reweight") == {
        "swan": 2.0,
        "red": 0.5,
        "beak": -0.1,
    }
    assert parse_word_values([], "--reweight") == {}


@pytest.mark.parametrize("item", ["x", "=2", "swan=", "swan=big", "swan=nan", "black swan=2"])
def test_parse_word_values_refuses_bad_syntax(item: str) -> None:
    with pytest.raises(FatezeroError, match=f"--reweight expects WORD=VALUE, got '{item}'"):
        parse_word_values([item], "--reweight")


def test_parse_word_values_refuses_a_repeated_word() -> None:
    with pytest.raises(FatezeroError, match="--cross-word gives 'swan' more than once"):
        parse_word_values(["swan=0.2", "swan=0.4"], "--cross-word")
