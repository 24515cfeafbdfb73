"""The built-in synthetic captioned dataset of `make demo` and the tests: coloured shapes on a coloured
background, written as an imagefolder with metadata.jsonl."""
from __future__ import annotations

import json
import math
import os
import random

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 20), "purple": (140, 40, 170), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# Width:height of the images with `mixed_aspect_ratios`: squares, portraits, landscapes and two extreme ones.
ASPECT_RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (2, 1), (1, 2), (3, 1))


def write_synthetic_dataset(directory: str | os.PathLike, n_images: int, resolution: int = 64,
                            seed: int = 0, empty_caption_fraction: float = 0.0,
                            mixed_aspect_ratios: bool = False) -> list[str]:
    """Writes an imagefolder of coloured shapes with metadata.jsonl (file_name, text); returns the captions.

    Each image: a background colour and a different shape colour; a circle, square or triangle of
    40-80% of the image at a random position; caption "a {colour} {shape} on a {colour} background".
    `empty_caption_fraction` of the images (drawn at random) get the empty caption instead: a model trained
    from scratch then also learns the unconditional prediction that classifier-free guidance needs (SD dropped
    10% of its captions); the images are the same whatever the fraction. `mixed_aspect_ratios`: each image of
    about resolution^2 pixels at one of ASPECT_RATIOS (drawn from a stream of its own: the shapes, colours and
    captions are the square dataset's), the shape sized and placed within the shorter side.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    empty_rng = random.Random(f"{seed}-empty")  # its own stream: the images do not depend on the fraction
    ratio_rng = random.Random(f"{seed}-ratios")
    names = list(COLORS)
    captions, lines = [], []
    for i in range(n_images):
        background, color = rng.sample(names, 2)
        shape = rng.choice(SHAPES)
        width = height = resolution
        if mixed_aspect_ratios:
            ratio_w, ratio_h = ratio_rng.choice(ASPECT_RATIOS)
            width = round(resolution * math.sqrt(ratio_w / ratio_h))
            height = round(resolution * math.sqrt(ratio_h / ratio_w))
        short = min(width, height)
        size = rng.uniform(0.4, 0.8) * short
        x0 = rng.uniform(0, short - size) + (width - short) / 2
        y0 = rng.uniform(0, short - size) + (height - short) / 2
        box = (x0, y0, x0 + size, y0 + size)
        image = Image.new("RGB", (width, height), COLORS[background])
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=COLORS[color])
        file_name = f"{i:05d}.png"
        image.save(os.path.join(directory, file_name))
        caption = f"a {color} {shape} on a {background} background"
        if empty_caption_fraction and empty_rng.random() < empty_caption_fraction:
            caption = ""
        captions.append(caption)
        lines.append(json.dumps({"file_name": file_name, "text": caption}))
    with open(os.path.join(directory, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return captions
