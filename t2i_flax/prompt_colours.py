"""Does a picture show its prompt's colours? The check a person makes on the demo's validation grids, for
prompts of the synthetic dataset ("a red circle on a blue background": a red shape, a blue background).

    background_RGB, shape_RGB = image_colours(image_HWC)
    matched = colour_matches(images_NHWC, prompts_of_images, prompts)  # bool per image

An image matches when its (background, shape) colours are nearer its own prompt's than any other prompt's."""
from __future__ import annotations

import numpy as np

from t2i_flax.synthetic import COLORS, SHAPES

BORDER = 2  # pixels of the frame whose median colour is the background's
SHAPE_DISTANCE = 80.0  # RGB distance from the background beyond which a pixel belongs to the shape
MIN_SHAPE_FRACTION = 0.03  # fewer shape pixels than this: no shape (its colour counts as the background's)


def prompt_colours(prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB (background, shape) of a synthetic caption: the colour words before "background" and the shape."""
    words = prompt.lower().split()
    background = words[words.index("background") - 1]
    shape = next(words[i - 1] for i, word in enumerate(words) if word in SHAPES)
    return np.array(COLORS[background], np.float32), np.array(COLORS[shape], np.float32)


def image_colours(image_HWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB (background, shape) of a uint8 image: the median of its frame, the median of the pixels far from
    that (the background again when there are too few of them)."""
    pixels_HWC = np.asarray(image_HWC, np.float32)
    frame = np.ones(pixels_HWC.shape[:2], bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    background = np.median(pixels_HWC[frame], axis=0)
    far = np.linalg.norm(pixels_HWC - background, axis=-1) > SHAPE_DISTANCE
    if far.mean() < MIN_SHAPE_FRACTION:
        return background, background
    return background, np.median(pixels_HWC[far], axis=0)


def colour_matches(images_NHWC, image_prompts: list[str], prompts: list[str]) -> np.ndarray:
    """For each image: are its colours nearer those of its prompt (`image_prompts[i]`) than those of every
    other prompt of `prompts`? Distance: background's plus shape's RGB distance."""
    expected = np.array([np.concatenate(prompt_colours(prompt)) for prompt in prompts])  # (P, 6)
    matches = []
    for image, own in zip(images_NHWC, image_prompts):
        seen = np.concatenate(image_colours(image))
        distances = (np.linalg.norm(expected[:, :3] - seen[:3], axis=1)
                     + np.linalg.norm(expected[:, 3:] - seen[3:], axis=1))
        matches.append(prompts[int(np.argmin(distances))] == own)
    return np.array(matches)
