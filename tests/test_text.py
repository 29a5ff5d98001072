"""The tokenizer gives the reference Llama-3 ids and CSM's `[speaker]text` framing."""

import json

import pytest

from csm_jax.io.text import TokenizerError, load_tokenizer, tokenize_segment_text


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


# Ids from Hugging Face's Llama-3 tokenizer.json (unsloth/Llama-3.2-1B; SmolLM3 reuses the same vocabulary).
KNOWN = {
    "Hello world, I am a": [9906, 1917, 11, 358, 1097, 264],
    "你好，SmolLM3！": [57668, 53901, 3922, 10902, 337, 11237, 18, 6447],
}


def test_offline_default_matches_reference_ids(tokenizer):
    for text, ids in KNOWN.items():
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (128000, 128001, 128256)


def test_segment_framing(tokenizer):
    ids = tokenize_segment_text(tokenizer, "Hello world, I am a", 0)
    assert ids == [128000, 58, 15, 60, 9906, 1917, 11, 358, 1097, 264, 128001]  # "[", "0", "]" then the text
    assert tokenize_segment_text(tokenizer, "", "1")[1:-1] == tokenizer.encode("[1]")


def test_tokenizer_json_directory_gives_the_same_ids(tmp_path, tokenizer):
    """A local tokenizers-format file: a word-level vocabulary with the Llama-3 special tokens is enough to check
    that the directory path loads, frames with the right ids and encodes without adding specials."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<|begin_of_text|>": 3, "<|end_of_text|>": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("hello world") == [1, 2]
    assert (loaded.bos_id, loaded.eos_id) == (3, 4)


def test_bad_sources_explain_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(TokenizerError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path)
