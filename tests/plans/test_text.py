import gzip
import random

import pytest
import torch

from dlexport.plans.text import ByteTokenizer, NotEnoughTextError, load_splits


def test_too_little_text_names_the_fix(tmp_path):
    (tmp_path / "short.txt").write_text("Only a few words of prose here.")
    with pytest.raises(NotEnoughTextError, match="--data"):
        load_splits(ByteTokenizer(512), {"calibration": 4, "evaluation": 4}, 64, [tmp_path])


def test_splits_are_deterministic_disjoint_and_read_gzip(tmp_path):
    prose = " ".join(f"Sentence number {i} says something plain about the weather." for i in range(400))
    with gzip.open(tmp_path / "README.gz", "wt") as f:
        f.write(prose)
    a = load_splits(ByteTokenizer(512), {"calibration": 5, "evaluation": 7}, 32, [tmp_path])
    b = load_splits(ByteTokenizer(512), {"calibration": 5, "evaluation": 7}, 32, [tmp_path])
    assert a["calibration"].shape == (5, 32) and a["evaluation"].shape == (7, 32)
    assert a.digest == b.digest
    calib = {tuple(r) for r in a["calibration"].tolist()}
    assert not calib & {tuple(r) for r in a["evaluation"].tolist()}


def test_machine_prose_is_enough_for_the_defaults():
    s = load_splits(ByteTokenizer(512), {"calibration": 8, "evaluation": 16}, 128)
    assert s.files >= 1 and s["evaluation"].shape == (16, 128)


def test_no_command_fits_on_text_another_evaluates_on():
    small = load_splits(ByteTokenizer(512), {"calibration": 8, "evaluation": 16}, 64)
    large = load_splits(ByteTokenizer(512), {"calibration": 8, "evaluation": 16, "adapter": 64}, 64)
    fitted = {tuple(r) for s in (small, large) for k in ("calibration", "adapter") if k in s.splits
              for r in s[k].tolist()}
    held = {tuple(r) for s in (small, large) for r in s["evaluation"].tolist()}
    assert not fitted & held
    assert torch.equal(small["evaluation"], large["evaluation"])


WORDS = [f"w{a}{b}" for a in "abcdefg" for b in "aeiou"]


def _word_tokenizer(bos: bool):
    """A word-level Hugging Face tokenizer that, like Gemma's, puts <bos> before every text (or, like SmolLM2's, not)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<bos>", "<unk>"] + WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")


@pytest.mark.parametrize("bos", [True, False])
def test_every_sequence_starts_as_the_tokenizer_starts_a_text(bos, tmp_path):
    rng = random.Random(0)
    (tmp_path / "words.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    s = load_splits(_word_tokenizer(bos), {"calibration": 4, "evaluation": 4}, 32, [tmp_path])
    for split in ("calibration", "evaluation"):
        assert s[split].shape == (4, 32)
        assert (s[split][:, 0] == 0).all() == bos and (s[split][:, 1:] != 0).all()
