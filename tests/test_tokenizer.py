"""The tiny offline CLIP tokenizer and caption tokenization (truncation counts, the folder's pad token)."""
import json
import pickle

import numpy as np
import pytest

from t2i_flax.errors import ModelError
from t2i_flax.tokenizer import (
    SDXL_PAD_TOKEN,
    TINY_WORDS,
    bytes_to_unicode,
    count_truncated,
    folder_pad_token,
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


CAPTIONS = ["a red circle on a blue background", "a red circle!", "hello!! world, big STAR !", "", "!",
            "red " * 80, "a tiny dark square at the light background of the picture"]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", SDXL_PAD_TOKEN])
def test_ids_match_transformers_for_both_pad_tokens(tmp_path, pad_token):
    """Our tokenizer (load_tokenizer + tokenize_captions) gives transformers' CLIPTokenizer ids, padding included,
    for SD 1.x's pad token and SDXL tokenizer_2's "!"."""
    from transformers import CLIPTokenizer

    write_tiny_clip_tokenizer(tmp_path, pad_token=pad_token)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((tmp_path / name).read_text())["pad_token"] == pad_token
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    ours = load_tokenizer(tmp_path)
    reference = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert ours.pad_token == reference.pad_token == pad_token
    assert ours.pad_token_id == vocab[pad_token] and ours.eos_token_id == vocab["<|endoftext|>"]
    ids, n_truncated = tokenize_captions(ours, CAPTIONS)
    want = reference(CAPTIONS, max_length=77, padding="max_length", truncation=True)["input_ids"]
    assert ids.tolist() == want
    assert n_truncated == 1
    # every caption: bos, its tokens, one eos, then pad ids to the end
    for row, caption in zip(ids.tolist(), CAPTIONS):
        length = len(reference(caption, max_length=77, truncation=True)["input_ids"])
        assert row[length - 1] == vocab["<|endoftext|>"]
        assert row[length:] == [vocab[pad_token]] * (77 - length)
    if pad_token == SDXL_PAD_TOKEN:
        assert vocab[SDXL_PAD_TOKEN] == 0  # as in CLIP's real vocabulary
        assert ids[3].tolist() == [vocab["<|startoftext|>"], vocab["<|endoftext|>"]] + [0] * 75


def test_pad_token_comes_from_the_folder(tmp_path):
    """special_tokens_map.json's pad token over tokenizer_config.json's (as transformers reads them), an
    AddedToken object as well as a string; CLIPTokenizer's default when neither names one."""
    from transformers import CLIPTokenizer

    def folder(name, config_pad, map_pad):
        directory = tmp_path / name
        write_tiny_clip_tokenizer(directory)
        for file, pad in (("tokenizer_config.json", config_pad), ("special_tokens_map.json", map_pad)):
            path = directory / file
            if pad == "absent file":
                path.unlink()
                continue
            content = json.loads(path.read_text())
            if pad is None:
                del content["pad_token"]
            else:
                content["pad_token"] = pad
            path.write_text(json.dumps(content))
        return directory

    added = {"__type": "AddedToken", "content": "!", "lstrip": False, "normalized": True, "rstrip": False,
             "single_word": False}
    cases = {  # tokenizer_config.json's, special_tokens_map.json's, the folder's, the loaded pad token
        "map_wins": ("<|endoftext|>", "!", "!", "!"),
        "config_only": ("!", "absent file", "!", "!"),
        "added_token_object": (added, added, "!", "!"),
        "none_named": (None, None, None, "<|endoftext|>"),
    }
    for name, (config_pad, map_pad, named, loaded) in cases.items():
        directory = folder(name, config_pad, map_pad)
        assert folder_pad_token(str(directory)) == named, name
        tokenizer = load_tokenizer(directory)
        assert tokenizer.pad_token == CLIPTokenizer.from_pretrained(str(directory)).pad_token == loaded, name


def test_pad_token_outside_the_vocabulary_is_refused(tmp_path):
    write_tiny_clip_tokenizer(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        content = json.loads((tmp_path / name).read_text())
        content["pad_token"] = "<pad>"
        (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(ModelError, match="pads with '<pad>', which is not in its vocabulary"):
        load_tokenizer(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text("{broken")
    with pytest.raises(ModelError, match="cannot read special_tokens_map.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not in the tiny tokenizer's vocabulary"):
        write_tiny_clip_tokenizer(tmp_path / "other", pad_token="<pad>")
