"""Synthetic pictures of coloured shapes, with a caption and a few questions, all from one seed.

Each picture holds 1-3 shapes (circle, square, triangle, star) in 8 colours, of varied sizes and positions, on a
plain or two-tone light background. Shapes never overlap and their centres are well apart horizontally, so "left to
right" is unambiguous, and the caption names them in that order:

    one shape    "a red circle."  ("an orange star.")
    two shapes   "a red circle and a blue square."
    three        "a red circle, a blue square and a green star."

Questions (the answer is always one short sentence ending in "."):

    "Describe this image."          -> the caption
    "What colour is the circle?"    -> "red."        (asked only when exactly one circle is in the picture)
    "What color is the circle?"     -> same
    "How many shapes?"              -> "one." / "two." / "three."
    "What shape is red?"            -> "a circle."   (asked only when exactly one shape is red)

Everything is drawn with Pillow at 4x and downsampled (antialiased edges); the canvas is 48, 64, 96 or 128 pixels
square (the model's image processor resizes it to its input size, as it would any image).
"""
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = {
    "red": (220, 30, 35),
    "orange": (250, 140, 20),
    "yellow": (240, 215, 20),
    "green": (30, 155, 55),
    "blue": (35, 75, 225),
    "purple": (135, 45, 175),
    "pink": (250, 120, 190),
    "brown": (130, 80, 35),
}
COLOUR_NAMES = list(COLOURS)
# Light backgrounds, far from every shape colour.
BACKGROUNDS = [
    (255, 255, 255),
    (225, 225, 225),
    (245, 238, 215),
    (215, 230, 245),
    (220, 242, 222),
    (240, 225, 240),
]
CANVAS_SIZES = [48, 64, 96, 128]
NUMBERS = ["zero", "one", "two", "three"]
SUPERSAMPLE = 4
MIN_DX = 0.2  # horizontal distance between two shapes' centres, in picture widths
GAP = 0.03  # empty space between two shapes

DESCRIBE = "Describe this image."
QUESTION_KINDS = ["describe", "colour", "count", "shape"]
QUESTION_WEIGHTS = [0.5, 0.22, 0.14, 0.14]


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def caption(shapes):
    """shapes: [(shape, colour), ...] left to right."""
    parts = [f"{article(c)} {c} {s}" for s, c in shapes]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def sample_layout(rng):
    """[(shape, colour, cx, cy, r)] in unit coordinates, sorted left to right. Shapes never overlap and their
    centres are at least MIN_DX apart horizontally, so the left-to-right order is never in doubt."""
    n = int(rng.integers(1, 4))
    r_lo, r_hi = {1: (0.14, 0.32), 2: (0.12, 0.24), 3: (0.11, 0.19)}[n]
    while True:
        rs = rng.uniform(r_lo, r_hi, size=n)
        xs = [rng.uniform(r + 0.02, 1 - r - 0.02) for r in rs]
        ys = [rng.uniform(r + 0.02, 1 - r - 0.02) for r in rs]
        ok = all(
            abs(xs[i] - xs[j]) >= MIN_DX and math.hypot(xs[i] - xs[j], ys[i] - ys[j]) >= rs[i] + rs[j] + GAP
            for i in range(n) for j in range(i + 1, n)
        )
        if ok:
            break
    out = []
    for i in np.argsort(xs):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        out.append((shape, colour, float(xs[i]), float(ys[i]), float(rs[i])))
    return out


def jitter(rgb, rng, amount):
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def draw_background(draw, size, rng):
    a = jitter(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], rng, 8)
    draw.rectangle([0, 0, size, size], fill=a)
    if rng.random() < 0.5:
        return
    # Two-tone: the second colour fills one side of a vertical, horizontal or diagonal split.
    while True:
        b = jitter(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], rng, 8)
        if sum(abs(x - y) for x, y in zip(a, b)) > 30:
            break
    t = rng.uniform(0.3, 0.7) * size
    kind = int(rng.integers(4))
    if kind == 0:
        draw.rectangle([0, 0, t, size], fill=b)
    elif kind == 1:
        draw.rectangle([0, 0, size, t], fill=b)
    elif kind == 2:
        draw.polygon([(0, 0), (size, 0), (0, size)], fill=b)
    else:
        draw.polygon([(0, 0), (size, size), (0, size)], fill=b)


def draw_shape(draw, shape, rgb, cx, cy, r):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif shape == "triangle":
        # Upright, base at the bottom, circumradius r, centred on the box.
        pts = [(cx + r * math.cos(a), cy + 0.15 * r - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, -math.pi / 6)]
        draw.polygon(pts, fill=rgb)
    elif shape == "star":
        pts = []
        for k in range(10):
            a = math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        draw.polygon(pts, fill=rgb)
    else:
        raise ValueError(shape)


def render(layout, rng, size):
    big = size * SUPERSAMPLE
    im = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(im)
    draw_background(draw, big, rng)
    for shape, colour, cx, cy, r in layout:
        draw_shape(draw, shape, jitter(COLOURS[colour], rng, 12), cx * big, cy * big, r * big)
    return im.resize((size, size), Image.Resampling.LANCZOS)


def question_and_answer(layout, rng):
    shapes = [(s, c) for s, c, *_ in layout]
    kind = QUESTION_KINDS[int(rng.choice(len(QUESTION_KINDS), p=QUESTION_WEIGHTS))]
    if kind == "colour":
        unique = [s for s in SHAPES if sum(1 for x, _ in shapes if x == s) == 1]
        if unique:
            s = unique[int(rng.integers(len(unique)))]
            word = "colour" if rng.random() < 0.5 else "color"
            colour = next(c for x, c in shapes if x == s)
            return kind, f"What {word} is the {s}?", f"{colour}."
    if kind == "shape":
        unique = [c for c in COLOUR_NAMES if sum(1 for _, x in shapes if x == c) == 1]
        if unique:
            c = unique[int(rng.integers(len(unique)))]
            shape = next(s for s, x in shapes if x == c)
            return kind, f"What shape is {c}?", f"a {shape}."
    if kind == "count":
        return kind, "How many shapes?", f"{NUMBERS[len(shapes)]}."
    return "describe", DESCRIBE, caption(shapes)


def sample(rng, size=None):
    """One example: (PIL image, question, answer, kind, layout)."""
    layout = sample_layout(rng)
    if size is None:
        size = CANVAS_SIZES[int(rng.integers(len(CANVAS_SIZES)))]
    image = render(layout, rng, size)
    kind, question, answer = question_and_answer(layout, rng)
    return image, question, answer, kind, layout


def corpus():
    """Every word the prompts and answers use (for the tokenizer)."""
    texts = ["User:", "\nAssistant:", DESCRIBE, "How many shapes?"]
    for s in SHAPES:
        texts += [f"What colour is the {s}?", f"What color is the {s}?", f"a {s}."]
    for c in COLOUR_NAMES:
        texts += [f"What shape is {c}?", f"{c}."]
    texts += [f"{n}." for n in NUMBERS[1:]]
    texts += [caption([(s, c), (s, c), (s, c)]) for s in SHAPES for c in COLOUR_NAMES]
    return texts


def patch_coverage(layout, image_size, patch_size, colour_index=None):
    """Per patch of the model's input grid, the fraction of it each shape covers: [grid*grid, len(layout)].
    Used only for the auxiliary training signal on the vision encoder; never stored in the model."""
    big = image_size * SUPERSAMPLE
    grid = image_size // patch_size
    out = np.zeros((grid * grid, len(layout)), dtype=np.float32)
    for i, (shape, _, cx, cy, r) in enumerate(layout):
        im = Image.new("L", (big, big))
        draw_shape(ImageDraw.Draw(im), shape, 255, cx * big, cy * big, r * big)
        a = np.asarray(im, dtype=np.float32)[: grid * patch_size * SUPERSAMPLE, : grid * patch_size * SUPERSAMPLE] / 255.0
        k = patch_size * SUPERSAMPLE
        out[:, i] = a.reshape(grid, k, grid, k).mean(axis=(1, 3)).reshape(-1)
    return out
