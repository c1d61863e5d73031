"""Coloured-shape scenes shared by the synthetic CLIP and LLaVA generators.

A `Scene` is a handful of discrete attributes (shape, colour, size, position, count,
background); `render` draws it and `caption` / `describe` turn it into text. Every random
choice comes from a numpy Generator keyed by (seed, stream, index), so any single image can be
rebuilt on its own and a run is byte-identical for a given seed.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "purple": (135, 45, 175),
    "brown": (120, 72, 32),
    "black": (28, 28, 28),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNTS = (1, 2, 3)
BACKGROUNDS = ("plain", "stripes", "dots", "noise")

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
PLURALS = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}
SIDES = {"square": 4, "triangle": 3, "hexagon": 6}  # shapes with straight sides, for Q&A facts

# Radius as a fraction of the image side; per-shape factors even out how big each shape looks. Large enough
# that a shape spans 2-4 patches of 8 px at 64 px (smaller ones are colour blobs to a tiny ViT); groups of
# two or three shrink so they never touch.
_RADIUS = {"small": 0.14, "large": 0.2}
_COUNT_SCALE = {1: 1.0, 2: 0.82, 3: 0.68}
_SHAPE_SCALE = {"circle": 0.92, "square": 1.1, "triangle": 1.25, "star": 1.25, "cross": 1.05, "hexagon": 1.0}

# Stream ids keep train, val and held-out eval images on disjoint random sequences.
STREAM_TRAIN, STREAM_VAL, STREAM_SQA, STREAM_BENCH, STREAM_TEXT = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    position: str
    count: int
    background: str

    @property
    def noun(self) -> str:
        """Shape noun, plural when count > 1."""
        return PLURALS[self.shape] if self.count > 1 else self.shape

    @property
    def classname(self) -> str:
        return f"{self.color} {self.shape}"


def rng_for(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent generator per (seed, stream, item), so items don't depend on order."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


def choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, shape: str | None = None, color: str | None = None) -> Scene:
    """Uniform over attributes; `shape`/`color` pin the class for the zero-shot val split."""
    s = choice(rng, SHAPES)
    c = choice(rng, tuple(COLORS))
    return Scene(
        shape=shape or s,
        color=color or c,
        size=choice(rng, SIZES),
        position=choice(rng, POSITIONS),
        count=int(choice(rng, COUNTS)),
        background=choice(rng, BACKGROUNDS),
    )


# ---------------------------------------------------------------------------------------------
# drawing

def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        angles, radii = [math.pi / 4 + k * math.pi / 2 for k in range(4)], [r] * 4
    elif shape == "triangle":
        angles, radii = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)], [r] * 3
    elif shape == "hexagon":
        angles, radii = [k * math.pi / 3 for k in range(6)], [r] * 6
    elif shape == "star":
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else 0.42 * r for k in range(10)]
    elif shape == "cross":
        w = 0.34 * r  # half arm width
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        angles = [math.atan2(y, x) for x, y in pts]
        radii = [math.hypot(x, y) for x, y in pts]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [(cx + rr * math.cos(a + rot), cy + rr * math.sin(a + rot)) for a, rr in zip(angles, radii)]


def _centers(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres in [0, 1] coordinates: a jittered row/column along the named side,
    or a small cluster for "center"."""
    n = scene.count
    if scene.position == "center":
        if n == 1:
            pts = [(0.5, 0.5)]
        else:
            rad = 0.2 if n == 2 else 0.22
            a0 = rng.uniform(0, 2 * math.pi)
            pts = [(0.5 + rad * math.cos(a0 + 2 * math.pi * k / n), 0.5 + rad * math.sin(a0 + 2 * math.pi * k / n)) for k in range(n)]
        return [(x + rng.uniform(-0.03, 0.03), y + rng.uniform(-0.03, 0.03)) for x, y in pts]
    lo, hi = 0.08, 0.92
    slot = (hi - lo) / n
    along = [lo + (k + 0.5) * slot + rng.uniform(-0.12, 0.12) * slot for k in range(n)]
    side = {"left": 0.23, "right": 0.77, "top": 0.23, "bottom": 0.77}[scene.position]
    across = [side + rng.uniform(-0.03, 0.03) for _ in range(n)]
    if scene.position in ("left", "right"):
        return list(zip(across, along))
    return list(zip(along, across))


def _pastel(rng: np.random.Generator) -> np.ndarray:
    """Mildly tinted light colour: white mixed with a random hue."""
    hue = rng.uniform(0, 1, 3)
    return 255.0 * (1 - rng.uniform(0.08, 0.22)) + hue * rng.uniform(10, 35)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base = _pastel(rng)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    scale = size / 64.0
    if kind == "plain":
        return img
    if kind == "noise":
        return img + rng.normal(0.0, 14.0, (size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dark = rng.uniform(25, 45)
    if kind == "stripes":
        theta = choice(rng, (0.0, 45.0, 90.0, 135.0)) * math.pi / 180
        period = rng.uniform(6, 11) * scale
        t = (xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0, period)) % period
        mask = (t < period / 2).astype(np.float32)
    elif kind == "dots":
        step = rng.uniform(7, 11) * scale
        rad = rng.uniform(1.2, 2.0) * scale
        ox, oy = rng.uniform(0, step, 2)
        dx = (xx + ox) % step - step / 2
        dy = (yy + oy) % step - step / 2
        mask = np.clip(rad + 0.5 - np.sqrt(dx * dx + dy * dy), 0, 1)  # soft edge
    else:
        raise ValueError(f"unknown background {kind!r}; choose from {BACKGROUNDS}")
    return img - dark * mask[..., None]


def render(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Draw `scene` as an RGB image; geometry and colour jitter come from `rng`."""
    bg = _background(scene.background, image_size, rng)
    ss = 4 if image_size <= 128 else 2  # supersample the mask for anti-aliased edges
    big = image_size * ss
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    base_r = _RADIUS[scene.size] * _COUNT_SCALE[scene.count] * _SHAPE_SCALE[scene.shape]
    for cx, cy in _centers(scene, rng):
        r = base_r * rng.uniform(0.9, 1.1) * big
        rot = rng.uniform(-25, 25) * math.pi / 180
        x, y = cx * big, cy * big
        if scene.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        else:
            draw.polygon(_polygon(scene.shape, x, y, r, rot), fill=255)
    alpha = np.asarray(mask.reduce(ss), dtype=np.float32)[..., None] / 255.0
    fg = np.asarray(COLORS[scene.color], dtype=np.float32) + rng.uniform(-15, 15, 3)
    out = bg * (1 - alpha) + fg * alpha
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def png_bytes(img: Image.Image) -> bytes:
    """PNG with fixed settings and no metadata chunks, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# text

POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle"),
}
BACKGROUND_PHRASES = {
    "plain": ("a plain background", "a blank background"),
    "stripes": ("a striped background", "a background of stripes"),
    "dots": ("a dotted background", "a polka-dot background"),
    "noise": ("a noisy background", "a grainy background"),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}

# Caption templates: every one names the colour and the shape (the zero-shot class).
_CAPTIONS = (
    "{n} {size} {color} {noun} {pos} on {bg}.",
    "{n} {color} {noun} {pos}.",
    "{bg} with {n} {size} {color} {noun} {pos}.",
    "there {be} {num} {size} {color} {noun} {pos}.",
    "a picture of {n} {size} {color} {noun} on {bg}.",
    "{num} {noun}, {color} and {size}, {pos}.",
    "{color} {noun} {pos}, {num} in total, on {bg}.",
    "an image showing {n} {color} {noun} {pos} over {bg}.",
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def count_phrase(count: int, next_word: str, rng: np.random.Generator | None = None) -> str:
    """Number word, or for one object "a"/"an"/"one" (mixed so captions don't all read alike)."""
    if count > 1:
        return NUMBER_WORDS[count]
    if rng is not None and rng.random() < 0.3:
        return "one"
    return article(next_word)


# Half the captions name only count, colour and shape: fewer attributes per caption is what lets a tiny
# tower learn shape within a CPU budget (with every attribute in every caption it learnt colour only).
_SHORT_CAPTIONS = ("{n} {color} {noun}.", "{num} {color} {noun}.")


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption, template and synonyms drawn from `rng`."""
    template = choice(rng, _SHORT_CAPTIONS if rng.random() < 0.5 else _CAPTIONS)
    size = choice(rng, SIZE_WORDS[scene.size])
    words = {
        "size": size,
        "color": scene.color,
        "noun": scene.noun,
        "num": NUMBER_WORDS[scene.count],
        "be": "is" if scene.count == 1 else "are",
        "pos": choice(rng, POSITION_PHRASES[scene.position]),
        "bg": choice(rng, BACKGROUND_PHRASES[scene.background]),
    }
    if "{n}" in template:  # the placeholder right after {n} decides a/an
        after = template.split("{n} ", 1)[1].split()[0].strip("{}")
        words["n"] = count_phrase(scene.count, words[after], rng)
    text = template.format(**words)
    return text[0].upper() + text[1:]


def describe(scene: Scene) -> str:
    """Deterministic multi-sentence description (detail answers, bench contexts)."""
    num = NUMBER_WORDS[scene.count]
    bg = {"plain": "plain", "stripes": "striped", "dots": "dotted", "noise": "noisy, grainy"}[scene.background]
    where = POSITION_PHRASES[scene.position][0]
    if scene.count == 1:
        first = f"The image shows a single {scene.size} {scene.color} {scene.shape} {where} of the frame."
    else:
        first = f"The image shows {num} {scene.size} {scene.color} {scene.noun} grouped {where} of the frame."
    second = f"The background is {bg} with a light, muted tint."
    if scene.shape in SIDES:
        third = f"Each {scene.shape} has {NUMBER_WORDS[SIDES[scene.shape]]} straight sides."
    else:
        third = {
            "circle": "A circle is round and has no corners.",
            "star": "Each star has five points.",
            "cross": "Each cross has four arms of equal length.",
        }[scene.shape]
    rest = "The rest of the image is empty."
    return " ".join([first, second, third, rest])
