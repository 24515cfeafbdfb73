"""The tiny offline CLIP tokenizer and caption tokenization (truncation counts)."""
import json
import pickle

import numpy as np
import pytest

from t2i_flax.errors import ModelError
from t2i_flax.tokenizer import (
    TINY_WORDS,
    bytes_to_unicode,
    count_truncated,
    load_tokenizer,
    tokenize_captions,
    write_tiny_clip_tokenizer,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    vocab_size = write_tiny_clip_tokenizer(directory)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    return directory, vocab_size, vocab, load_tokenizer(directory)


def test_files_and_vocabulary_layout(tiny):
    directory, vocab_size, vocab, _ = tiny
    assert sorted(p.name for p in directory.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert vocab_size == len(vocab) < 1000
    merges = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    # CLIP's layout: 256 byte symbols, their end-of-word forms, one token per merge, bos, eos.
    alphabet = list(bytes_to_unicode().values())
    by_id = sorted(vocab, key=vocab.get)
    assert by_id[:256] == alphabet
    assert by_id[256:512] == [s + "</w>" for s in alphabet]
    assert by_id[512:-2] == ["".join(m.split(" ")) for m in merges[1:]]
    assert by_id[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert list(vocab.values()) == list(range(vocab_size))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["tokenizer_class"] == "CLIPTokenizer"


def test_round_trip_of_a_caption(tiny):
    _, vocab_size, vocab, tokenizer = tiny
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (vocab_size - 2, vocab_size - 1)
    ids, n_truncated = tokenize_captions(tokenizer, ["a red circle on a blue background"])
    words = ["a", "red", "circle", "on", "a", "blue", "background"]
    expected = [vocab["<|startoftext|>"]] + [vocab[w + "</w>"] for w in words]
    expected += [vocab["<|endoftext|>"]] * (77 - len(expected))
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0].tolist() == expected
    assert n_truncated == 0
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a red circle on a blue background"


def test_every_listed_word_is_one_token_and_case_is_folded(tiny):
    _, _, vocab, tokenizer = tiny
    for word in TINY_WORDS:
        assert tokenizer(word)["input_ids"][1:-1] == [vocab[word + "</w>"]], word
    upper = tokenize_captions(tokenizer, ["A RED Circle,  on the\tbackground!"])[0][0]
    tokens = tokenizer.convert_ids_to_tokens(upper[:10].tolist())
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", ",</w>", "on</w>", "the</w>",
                      "background</w>", "!</w>", "<|endoftext|>"]


def test_unknown_words_fall_back_to_byte_symbols(tiny):
    _, _, vocab, tokenizer = tiny
    ids = tokenizer("zebra 42")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zebra 4 2"  # CLIP splits digits
    assert len(ids) > 2 + 3  # zebra is several tokens
    assert vocab["z"] in ids and vocab["4</w>"] in ids and vocab["2</w>"] in ids


def test_truncation_is_counted_and_keeps_eos(tiny):
    _, _, vocab, tokenizer = tiny
    red, eos = vocab["red</w>"], vocab["<|endoftext|>"]
    captions = ["red " * 75, "red " * 76, "red " * 200, "", "a red circle"]
    ids, n_truncated = tokenize_captions(tokenizer, captions)
    assert n_truncated == 2  # 75 words + bos + eos = 77 fits; 76 and 200 do not
    assert count_truncated(tokenizer, captions) == 2
    assert ids[0].tolist() == [vocab["<|startoftext|>"]] + [red] * 75 + [eos]
    assert ids[1].tolist() == ids[2].tolist() == ids[0].tolist()  # truncated to the same 75 words + eos
    assert ids[3].tolist() == [vocab["<|startoftext|>"]] + [eos] * 76  # empty caption: bos, eos, padding
    assert tokenize_captions(tokenizer, [])[0].shape == (0, 77)


def test_model_max_length_is_honoured(tmp_path):
    write_tiny_clip_tokenizer(tmp_path, model_max_length=8)
    tokenizer = load_tokenizer(tmp_path)
    ids, n_truncated = tokenize_captions(tokenizer, ["a red circle on a blue background", "a red circle"])
    assert ids.shape == (2, 8) and n_truncated == 1
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a red circle on a blue"


def test_pickled_tokenizer_gives_the_same_ids(tiny):
    tokenizer = tiny[3]
    clone = pickle.loads(pickle.dumps(tokenizer))  # data workers receive a pickled tokenizer
    caption = "a small green triangle on a black background"
    assert clone(caption)["input_ids"] == tokenizer(caption)["input_ids"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "vocab.json").write_text("{not json")
    (tmp_path / "broken" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ModelError, match="cannot load the CLIP tokenizer in"):
        load_tokenizer(tmp_path / "broken")
