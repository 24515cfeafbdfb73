"""Caption tags (kohya's options): --shuffle_caption, --keep_tokens N, --caption_tag_dropout p, split on
--caption_separator.

A caption is split on the separator into tags, each stripped of surrounding whitespace; empty tags (from a
trailing or doubled separator) are left out. The first `keep_tokens` tags stay first, in their order, and are
never dropped; the others are shuffled (--shuffle_caption), then each is dropped with probability p
(--caption_tag_dropout); the tags are joined with ", " (whatever the separator), as kohya does. With neither
shuffle nor dropout the caption is left exactly as it is (keep_tokens and the separator alone change nothing).

The draws come from the sample's own random stream (data/order.py `sample_rng`), after its other draws, and
only for the options that are set: one permutation of the non-kept tags with --shuffle_caption, then one
uniform per non-kept tag with --caption_tag_dropout, so a resumed run draws the same caption and a run without
these options keeps its stream.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TagOptions:
    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0
    separator: str = ","

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout > 0

    def apply(self, caption: str, rng: np.random.Generator) -> str:
        """The caption with its tags shuffled and dropped as the options say (the caption itself when neither
        shuffle nor dropout is on, or when it is "")."""
        if not self.active or not caption:
            return caption
        tags = [tag.strip() for tag in caption.split(self.separator)]
        tags = [tag for tag in tags if tag]
        kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        if self.shuffle and rest:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        if self.dropout > 0 and rest:
            survives = rng.random(len(rest)) >= self.dropout
            rest = [tag for tag, keep in zip(rest, survives) if keep]
        return ", ".join(kept + rest)
