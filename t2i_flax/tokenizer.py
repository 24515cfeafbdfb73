"""CLIP tokenizer: loading, batch tokenization with truncation counts, and a tiny offline tokenizer.

The model's tokenizer is a `transformers.CLIPTokenizer` loaded from a local folder (the `tokenizer/`
subfolder of a diffusers model). In transformers 5, `CLIPTokenizer(vocab_file=..., merges_file=...)`
silently ignores the files, so the only way in is `CLIPTokenizer.from_pretrained(folder)`.

The pad token is the folder's own: SD 1.x/2.x tokenizers pad with `<|endoftext|>`, SDXL's `tokenizer_2`
with `!` (its special_tokens_map.json and tokenizer_config.json say `"pad_token": "!"`).

`write_tiny_clip_tokenizer` writes a real CLIP-format tokenizer folder (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json) whose vocabulary is the 256 byte-level symbols, their
end-of-word forms, BPE merges that make a small set of English words single tokens, and the two
special tokens; `pad_token="!"` makes it pad like SDXL's tokenizer_2. It needs no network and no torch;
the demo and the tests use it.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import numpy as np

from t2i_flax.errors import ModelError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SDXL_PAD_TOKEN = "!"  # SDXL's tokenizer_2 (OpenCLIP's padding); id 0 in CLIP's vocabulary, as in the tiny one
END_OF_WORD = "</w>"

# Words that become single tokens in the tiny tokenizer (the synthetic demo captions use them).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "on", "of", "in", "with", "and", "at", "is", "to",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "grey",
    "brown", "cyan", "magenta",
    "circle", "square", "triangle", "rectangle", "star", "shape", "dot",
    "background", "small", "large", "big", "tiny", "photo", "picture", "image",
    "dark", "light", "bright",
)


def folder_pad_token(path: str) -> str | None:
    """The pad token a tokenizer folder names: special_tokens_map.json's, else tokenizer_config.json's (the
    order in which transformers, 4.x and 5, lets them override each other); None when neither names one.
    A token may be written as a string or as an AddedToken object ({"content": ...})."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as handle:
                content = json.load(handle)
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load the CLIP tokenizer in {path}: cannot read {name}: {error}") from None
        pad = content.get("pad_token") if isinstance(content, dict) else None
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return None


def load_tokenizer(path_or_dir: str | os.PathLike):
    """Loads the CLIP tokenizer saved in a local folder (vocab.json + merges.txt or tokenizer.json), with the
    folder's own pad token (`<|endoftext|>` for SD 1.x/2.x, `!` for SDXL's tokenizer_2; CLIPTokenizer's
    default `<|endoftext|>` when the folder names none). The pad token must be in the vocabulary: a token
    added on top would get an id past the text encoder's embedding table."""
    from transformers import CLIPTokenizer

    path = os.fspath(path_or_dir)
    if not os.path.isdir(path):
        raise ModelError(f"tokenizer folder {path!r} does not exist (expected the model's tokenizer/ subfolder)")
    pad = folder_pad_token(path)
    try:
        # Passed explicitly: the folder's pad token, whatever a transformers release makes of the two files.
        tokenizer = CLIPTokenizer.from_pretrained(path, **({"pad_token": pad} if pad is not None else {}))
    # Missing or malformed vocab.json / merges.txt: OSError, ValueError, or the tokenizers library's plain
    # Exception ("Error while initializing BPE"). Only this one call into a library reading the user's files.
    except Exception as error:  # noqa: BLE001
        raise ModelError(f"cannot load the CLIP tokenizer in {path}: {str(error).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id >= tokenizer.vocab_size:
        raise ModelError(f"the CLIP tokenizer in {path} pads with {tokenizer.pad_token!r}, which is not in its "
                         f"vocabulary of {tokenizer.vocab_size} tokens")
    return tokenizer


def tokenize_captions(tokenizer, captions: Sequence[str]) -> tuple[np.ndarray, int]:
    """Tokenizes captions to `tokenizer.model_max_length` ids each (padded, truncated).

    Returns (input_ids int32 of shape (len(captions), model_max_length), number of captions that were
    longer than model_max_length tokens, including bos/eos, and so were truncated).
    """
    captions = list(captions)
    max_length = int(tokenizer.model_max_length)
    if not captions:
        return np.zeros((0, max_length), np.int32), 0
    input_ids = tokenizer(captions, max_length=max_length, padding="max_length", truncation=True)["input_ids"]
    return np.asarray(input_ids, dtype=np.int32), count_truncated(tokenizer, captions)


def count_truncated(tokenizer, captions: Sequence[str]) -> int:
    """How many captions have more than model_max_length tokens (bos and eos included)."""
    captions = list(captions)
    if not captions:
        return 0
    max_length = int(tokenizer.model_max_length)
    # Truncating at max_length + 1 keeps lengths informative without the "sequence too long" warning.
    lengths = tokenizer(captions, max_length=max_length + 1, truncation=True)["input_ids"]
    return sum(len(ids) > max_length for ids in lengths)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: maps every byte to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    byte_values = list(printable)
    code_points = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, code_points)))


def _learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Plain BPE training on a list of words until every word is one symbol.

    Each word is a sequence of byte-level symbols, the last one carrying the end-of-word marker.
    The most frequent adjacent pair is merged first (ties: first seen in word order), so applying
    the learned merges by rank reproduces exactly these segmentations.
    """
    alphabet = bytes_to_unicode()
    segmentations = []
    for word in dict.fromkeys(words):  # unique, order kept
        symbols = [alphabet[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        segmentations.append(symbols)
    merges: list[tuple[str, str]] = []
    while True:
        counts: collections.Counter = collections.Counter()
        for symbols in segmentations:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] += 1
        if not counts:
            return merges
        best = max(counts, key=lambda pair: counts[pair])  # first maximal in insertion order
        merges.append(best)
        merged = best[0] + best[1]
        for n, symbols in enumerate(segmentations):
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            segmentations[n] = out


def write_tiny_clip_tokenizer(
    directory: str | os.PathLike, model_max_length: int = 77, words: Sequence[str] = TINY_WORDS,
    pad_token: str = EOS_TOKEN,
) -> int:
    """Writes a small offline CLIP tokenizer folder and returns its vocabulary size.

    Vocabulary (CLIP's order): 256 byte-level symbols, the same with "</w>", one token per merge,
    then <|startoftext|> and <|endoftext|> (also the unk token). Every word of `words` (lowercase
    letters) is a single token. `pad_token`: <|endoftext|> as in SD 1.x/2.x, or "!" (SDXL_PAD_TOKEN,
    id 0) as in SDXL's tokenizer_2; any token of the vocabulary is accepted.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    merges = _learn_merges([w.lower() for w in words])
    tokens = alphabet + [s + END_OF_WORD for s in alphabet] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the tiny tokenizer's vocabulary")
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # CLIP's merges.txt starts with a header line that readers skip
        f.writelines(f"{a} {b}\n" for a, b in merges)
    token_entry = lambda content: {  # noqa: E731
        "__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
        "rstrip": False, "single_word": False,
    }
    config = {
        "add_prefix_space": False,
        "bos_token": token_entry(BOS_TOKEN),
        "do_lower_case": True,
        "eos_token": token_entry(EOS_TOKEN),
        "errors": "replace",
        "model_max_length": int(model_max_length),
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": token_entry(EOS_TOKEN),
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    special = {
        "bos_token": {"content": BOS_TOKEN, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": {"content": EOS_TOKEN, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "pad_token": pad_token,
        "unk_token": {"content": EOS_TOKEN, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    }
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return len(vocab)
