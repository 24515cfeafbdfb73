"""Caption tags (--shuffle_caption, --keep_tokens, --caption_tag_dropout, --caption_separator): properties of the
tag operations, their place in each sample's random stream, the cached-latent path, the flags and resume."""
import collections
import math

import numpy as np
import pytest

from t2i_flax import model_card
from t2i_flax.config import DataConfig, RunConfig
from t2i_flax.data import latent_cache, resized_size, sample_rng
from t2i_flax.data.images import draw_crop_and_flip
from t2i_flax.data.captions import TagOptions

from test_data import IN_MEMORY, loader, solid_dataset, tokenizer  # noqa: F401 (fixture)

TAGS = [f"tag{i}" for i in range(12)]
CAPTION = " ,  ".join(TAGS) + " "  # irregular spacing: tags are stripped and joined with ", "


def tags_of(caption: str) -> list[str]:
    return caption.split(", ") if caption else []


def draws(options: TagOptions, n: int, caption: str = CAPTION) -> list[list[str]]:
    return [tags_of(options.apply(caption, np.random.default_rng([7, i]))) for i in range(n)]


def test_shuffle_keeps_the_first_tags_in_place_and_permutes_the_rest():
    results = draws(TagOptions(shuffle=True, keep_tokens=3), 400)
    for tags in results:
        assert tags[:3] == TAGS[:3]  # kept, in order
        assert sorted(tags) == sorted(TAGS)  # the same multiset: nothing lost or duplicated
    assert len({tuple(tags) for tags in results}) > 350  # 9! orders: repeats are rare
    # every non-kept tag lands in every non-kept slot, about uniformly (400 / 9 = 44 per cell)
    counts = collections.Counter((tags.index(tag), tag) for tags in results for tag in TAGS[3:])
    assert all(20 <= counts[(slot, tag)] <= 75 for slot in range(3, 12) for tag in TAGS[3:]), counts


def test_repeated_tags_are_kept_as_a_multiset():
    caption = "a, b, a, c, a"
    for tags in draws(TagOptions(shuffle=True, keep_tokens=1), 50, caption):
        assert tags[0] == "a" and collections.Counter(tags) == collections.Counter(["a", "b", "a", "c", "a"])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_frequency_is_p_within_binomial_tolerance_and_never_touches_kept_tags(p):
    results = draws(TagOptions(dropout=p, keep_tokens=2), 1000)
    trials = 1000 * 10  # the 10 tags after the kept two
    dropped = sum(10 - (len(tags) - 2) for tags in results)
    assert abs(dropped - p * trials) <= 4 * math.sqrt(trials * p * (1 - p)), (dropped, p * trials)
    for tags in results:
        assert tags[:2] == TAGS[:2]
        assert tags[2:] == [tag for tag in TAGS[2:] if tag in tags[2:]]  # dropout alone keeps the order
    per_tag = collections.Counter(tag for tags in results for tag in tags)
    for tag in TAGS[2:]:  # each tag on its own is dropped at about p too
        assert abs((1000 - per_tag[tag]) - 1000 * p) <= 4 * math.sqrt(1000 * p * (1 - p)), (tag, per_tag[tag])


def test_dropout_one_keeps_only_the_kept_tags_and_zero_options_change_nothing():
    assert all(tags == TAGS[:4] for tags in draws(TagOptions(dropout=1.0, keep_tokens=4), 20))
    assert all(tags == [] for tags in draws(TagOptions(dropout=1.0), 20))
    # neither shuffle nor dropout: the caption exactly as it is (keep_tokens and the separator alone do nothing),
    # and nothing drawn
    rng = np.random.default_rng(0)
    for options in (TagOptions(), TagOptions(keep_tokens=3, separator="|")):
        assert options.apply(CAPTION, rng) == CAPTION
    assert rng.random() == np.random.default_rng(0).random()


def test_separator_whitespace_and_empty_tags():
    options = TagOptions(shuffle=True, keep_tokens=1, separator="|")
    for tags in draws(options, 20, " 1girl | solo|| long hair |blue eyes |"):
        assert tags[0] == "1girl" and sorted(tags) == sorted(["1girl", "solo", "long hair", "blue eyes"])
    assert TagOptions(shuffle=True, separator="|").apply("", np.random.default_rng(0)) == ""
    assert TagOptions(shuffle=True, keep_tokens=5).apply("a ,b", np.random.default_rng(0)) == "a, b"


# ---- in the data pipeline -------------------------------------------------------------------------------


def decoded_tags(tokenizer, input_ids) -> list[str]:
    """The tags of a tokenized caption (the tiny tokenizer decodes ", " as " , ")."""
    text = tokenizer.decode(input_ids, skip_special_tokens=True)
    return [tag.strip() for tag in text.split(" , ")] if text else []


WORDS = ["red", "green", "blue", "yellow", "square", "circle", "cat", "dog"]


def tagged_dataset(n: int):
    return solid_dataset(n, captions=[", ".join(WORDS[i % 3:] + WORDS[:i % 3]) for i in range(n)])


def test_options_are_drawn_after_the_image_draws_and_repeat_per_sample(tokenizer):
    """The pixels and the other draws are those of a run without the options (byte for byte); each caption's
    tags are the record's own, the kept one first; the caption is the stream's continuation after the pick,
    the crop, the flip and the empty-prompt draw; the same (seed, epoch, record) gives the same caption, in a
    new loader too; a run without the options tokenizes the picked caption itself."""
    dataset = tagged_dataset(16)
    common = dict(host_batch_size=4, resolution=8, center_crop=False, random_flip=True, seed=3,
                  validate_images=False, proportion_empty_prompts=0.2)
    options = dict(shuffle_caption=True, keep_tokens=1, caption_tag_dropout=0.3)
    plain, tagged = loader(tokenizer, dataset, **common), loader(tokenizer, dataset, **common, **options)
    again = loader(tokenizer, dataset, **common, **options).example_fn
    example, tags = tagged.example_fn, TagOptions(shuffle=True, keep_tokens=1, dropout=0.3)
    changed = 0
    for position in range(48):  # three epochs
        epoch, slot = example.slots.slot(position)
        record = int(example.records[example._order(epoch)[slot]])
        caption = dataset[record]["text"]
        without, with_tags = plain.example_fn(position), example(position)
        np.testing.assert_array_equal(with_tags["pixel_values"], without["pixel_values"])
        np.testing.assert_array_equal(with_tags["input_ids"], again(position)["input_ids"])
        rng = sample_rng(3, epoch, record)
        rng.integers(0, 1)  # the caption pick (one caption)
        draw_crop_and_flip(rng, *resized_size(12, 10, 8), 8)  # crop top, crop left, flip
        empty = rng.random() < 0.2
        want = "" if empty else tags.apply(caption, rng)
        ids = lambda text: tokenizer(text, max_length=77, padding="max_length", truncation=True)["input_ids"]
        assert with_tags["input_ids"].tolist() == ids(want)
        assert without["input_ids"].tolist() == ids("" if empty else caption)
        got = decoded_tags(tokenizer, with_tags["input_ids"])
        if not empty:
            original = caption.split(", ")
            assert got[0] == original[0] and not collections.Counter(got) - collections.Counter(original)
            changed += got != original
    assert changed > 20


def test_cached_latent_examples_apply_the_same_caption_options(tokenizer, tmp_path):
    """--cache_latents: captions are still read and tokenized per sample, with the options, as online."""
    import jax

    from t2i_flax import sharding

    dataset = tagged_dataset(8)
    online = loader(tokenizer, dataset, host_batch_size=8, resolution=8, center_crop=True, random_flip=True,
                    validate_images=False, seed=5, shuffle_caption=True, keep_tokens=2, caption_tag_dropout=0.2,
                    proportion_empty_prompts=0.1)
    mesh = sharding.make_mesh(1)
    where = sharding.batch_sharding(mesh)
    encode = jax.jit(lambda pixels: (pixels, pixels * 0 + 1), out_shardings=(where, where))
    cache = latent_cache.LatentCache(str(tmp_path), {"test": 1}, online.example_fn.records, True, (3, 8, 8), 0, 1,
                                     per_host=8)
    cache.build(dataset, "image", 8, encode, mesh, show_progress=False)
    cached = latent_cache.CachedExampleAt(online.example_fn, {(8, 8): cache})
    for position in range(24):
        want, got = online.example_fn(position), cached(position)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"], err_msg=str(position))
        np.testing.assert_array_equal(got["latent_mean"], want["pixel_values"], err_msg=str(position))


# ---- flags, resume, model card ------------------------------------------------------------------------------


def test_caption_options_are_checked_on_resume_and_listed_on_the_card():
    base = RunConfig.from_flags({"pretrained_model_name_or_path": "m", "dataset_name": IN_MEMORY})
    tagged = RunConfig.from_flags({"pretrained_model_name_or_path": "m", "dataset_name": IN_MEMORY,
                                   "shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout": 0.25,
                                   "caption_separator": "|"})
    differences = tagged.resume_differences(base.to_dict())
    for flag in ("--shuffle_caption", "--keep_tokens", "--caption_tag_dropout", "--caption_separator"):
        assert any(d.startswith(flag + ":") for d in differences), differences
    assert tagged.resume_differences(tagged.to_dict()) == []
    # a checkpoint from before these flags: their defaults
    old = base.to_dict()
    for name in ("shuffle_caption", "keep_tokens", "caption_tag_dropout", "caption_separator"):
        del old["data"][name]
    assert base.resume_differences(old) == []
    assert model_card.caption_settings(tagged.data) == {
        "captions": "tags shuffled, tag dropout 0.25, first 1 tags kept, split on `\\|`"}
    assert model_card.caption_settings(base.data) == {}
    assert model_card.caption_settings(DataConfig(dataset_name=IN_MEMORY, proportion_empty_prompts=0.1)) == {
        "captions": "empty prompts 0.1"}
