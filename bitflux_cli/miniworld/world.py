"""The miniature world: flat shapes on white, GenEval-style captions, a held-out split.

A scene is one to three axis-aligned objects on a white 48x48 canvas, drawn without
anti-aliasing, each centred in its own cell of a 3x3 grid of 16-pixel cells (``GRID``), so that
objects are 4 pixels apart at least and 2 from the border:

- shapes ``circle``, ``square``, ``triangle`` (isosceles, apex up, filling a little over half its box);
- colours ``red``, ``green``, ``blue``, ``yellow`` (``COLORS``, at least 160 apart in RGB);
- size: the side of the object's box, 12 pixels (10-pixel shapes blurred 5x5 lose their geometry);
- position: one of the 9 cells; the two objects of a relation stand at opposite ends of one
  column (``above``, ``below``) or row (``left of``, ``right of``), which one drawn at random.

Why a grid: a 16-pixel cell is one token of the mini transformer (8x downsampling VAE, 2x2
latent patches), so an object is one token's content. With free positions and sizes 12-20 px
(objects straddling tokens), the mini model trained on two CPU cores for 73 minutes drew single
objects but merged the others into blobs (0.17 overall); on a 64x64 canvas with a 4x4 grid and
counts up to four, 64 minutes of training reached 0.58 (counting and position near chance). The
issue's rule is to make the world smaller, never the scorer laxer.

Why relations at opposite ends: with the two objects anywhere in one column or row (9 layouts a
relation), the mini model never learnt which way a relation word points: its prediction at pure
noise, averaged over seeds, did not depend on the relation (correlation with the data's relation-
specific mean image about 0, while the shape words moved it fully), and 55 minutes of training
left position at 0.28. On its own that mean is most of what has to be learnt, so a sharper one
(3 layouts a relation: first object in the top row or left column) makes the signal several times
stronger; fine-tuned on such scenes at high noise only, the same model's correlation rose to 0.5
in 300 steps (none in 400 steps on the 9-layout scenes).

A ``PromptSpec`` says what the caption constrains, like GenEval's ``include`` list; what it leaves
free is drawn at random (colours when not named, sizes and positions always). The caption names
every object in the scene. Six categories, one template each:

=============  ==================================  ==============================================
category       caption                             constrains
=============  ==================================  ==============================================
single_object  ``a circle``                        exactly one circle
two_object     ``a circle and a square``           one of each (two different shapes)
counting       ``three triangles``                 exactly 2 or 3 of the shape
colors         ``a blue square``                   one square, blue
position       ``a circle above a square``         circle's relation to the square (GenEval rule)
color_attr     ``a red circle and a green square`` both bindings (different shapes and colours)
=============  ==================================  ==============================================

In training, half of the position captions also name the colours drawn (``a green triangle left
of a yellow circle``), so a prompt that binds colours and a relation is in the model's language;
the position prompts that are scored never name colours, as in GenEval.

Split rule: a prompt is held out (``split="test"``) when it contains a held-out combination, and
training captions never contain one (the images of other categories may still show, say, a red
triangle captioned ``a triangle``: what is unseen is the caption's combination, not the pixels):

- colors: the (colour, shape) pair in ``HELD_OUT_COLOR_SHAPE`` (the pair may occur inside a
  two-object caption, never as a caption of its own);
- two_object: the ordered pair (first, second) in ``HELD_OUT_PAIRS`` (the reverse order is trained);
- counting: (count, shape) in ``HELD_OUT_COUNTS``;
- position: its shapes (unordered) and relation in ``HELD_OUT_POSITIONS``: both orders are unseen
  with that relation, each order is trained with the other relations, the relation with other shapes;
- color_attr: its words, (colours, shapes) as unordered pairs, in ``HELD_OUT_ATTR_WORDS``: both
  bindings of those words and both orders are unseen, each binding is trained with other partners.
- single_object has only three prompts and nothing to hold out: its test prompts are its train prompts.

Holding out whole word sets in position and colour attribution is deliberate: holding out one
order of a relation (``a triangle above a circle``) or one pairing of colours (``a green circle
and a red square``) leaves its word-for-word twin with the opposite meaning in training (``a
circle above a triangle``; ``a red circle and a green square``). On colour attribution the mini
model drew the twin (0.01, colours swapped): the split measured memorisation of the twin, not
composition. Position is held out the same way for the same reason.

Every shape and colour, every count and relation still occurs in training captions. Training
draws the categories the mini model finds hard (counting, position, colour attribution) two or
three times as often as the others (``TRAIN_WEIGHTS``).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 48
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30)}
BACKGROUND = (255, 255, 255)
GRID = 3  # cells a side
CELL = IMAGE_SIZE // GRID  # 16 pixels: one token of the mini transformer
SIZES = (12,)  # centred in a cell: 4 px between neighbours, 2 px to the border
NUMBERS = {2: "two", 3: "three"}
RELATIONS = ("above", "below", "left of", "right of")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
POSITION_THRESHOLD = 0.1  # GenEval's: centre offsets shrink by this fraction of both boxes' sizes
POSITION_CUT = 0.5  # GenEval's: a relation's share of the shrunk offset that makes it hold

HELD_OUT_COLOR_SHAPE = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})
HELD_OUT_PAIRS = frozenset({("square", "circle"), ("triangle", "square"), ("circle", "triangle")})
HELD_OUT_COUNTS = frozenset({(2, "triangle"), (3, "circle")})
HELD_OUT_POSITIONS = frozenset({(frozenset(p), r) for p, r in (
    (("circle", "square"), "above"), (("square", "triangle"), "below"),
    (("circle", "triangle"), "right of"), (("square", "triangle"), "left of"))})
HELD_OUT_ATTR_WORDS = frozenset({(frozenset(c), frozenset(s)) for c, s in (
    (("red", "green"), ("circle", "square")), (("blue", "yellow"), ("circle", "square")),
    (("red", "blue"), ("square", "triangle")), (("green", "yellow"), ("circle", "triangle")))})
TRAIN_WEIGHTS = {"single_object": 1, "two_object": 1, "counting": 2, "colors": 1, "position": 3, "color_attr": 2}

VOCAB_WORDS = sorted({"a", "and", *SHAPES, *(s + "s" for s in SHAPES), *COLORS, *NUMBERS.values(),
                      *(w for r in RELATIONS for w in r.split())})


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of ``shape``; ``color`` None leaves the colour free."""

    shape: str
    count: int = 1
    color: str | None = None

    @property
    def phrase(self) -> str:
        """``a red circle``, ``a circle`` or ``three circles``."""
        if self.count > 1:
            return f"{NUMBERS[self.count]} {self.shape}s"
        return f"a {self.color} {self.shape}" if self.color else f"a {self.shape}"


@dataclass(frozen=True)
class PromptSpec:
    """A prompt as checks: the objects it names and, for ``position``, objects[0] <relation> objects[1]."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def exact(self) -> bool:
        """Whether the count of each named shape must be exact (GenEval's ``exclude``), not a minimum."""
        return self.category in ("single_object", "counting")

    @property
    def caption(self) -> str:
        """The caption, derived from the spec."""
        phrases = [o.phrase for o in self.objects]
        return f" {self.relation} ".join(phrases) if self.relation else " and ".join(phrases)


@dataclass(frozen=True)
class Placed:
    """One drawn object: its box is ``[x, x + size) x [y, y + size)``."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1 and y1 exclusive."""
        return self.x, self.y, self.x + self.size, self.y + self.size


def _all_prompts(category: str) -> list[PromptSpec]:
    pairs = list(itertools.permutations(SHAPES, 2))
    if category == "single_object":
        return [PromptSpec(category, (ObjectSpec(s),)) for s in SHAPES]
    if category == "two_object":
        return [PromptSpec(category, (ObjectSpec(a), ObjectSpec(b))) for a, b in pairs]
    if category == "counting":
        return [PromptSpec(category, (ObjectSpec(s, n),)) for n in NUMBERS for s in SHAPES]
    if category == "colors":
        return [PromptSpec(category, (ObjectSpec(s, 1, c),)) for c in COLORS for s in SHAPES]
    if category == "position":
        return [PromptSpec(category, (ObjectSpec(a), ObjectSpec(b)), r) for a, b in pairs for r in RELATIONS]
    if category == "color_attr":
        return [PromptSpec(category, (ObjectSpec(a, 1, ca), ObjectSpec(b, 1, cb)))
                for a, b in pairs for ca, cb in itertools.permutations(COLORS, 2)]
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def held_out(spec: PromptSpec) -> bool:
    """Whether the prompt contains a held-out combination (see the module docstring)."""
    objs = spec.objects
    if spec.category == "colors":
        return (objs[0].color, objs[0].shape) in HELD_OUT_COLOR_SHAPE
    if spec.category == "color_attr":
        return (frozenset(o.color for o in objs), frozenset(o.shape for o in objs)) in HELD_OUT_ATTR_WORDS
    if spec.category == "two_object":
        return (objs[0].shape, objs[1].shape) in HELD_OUT_PAIRS
    if spec.category == "counting":
        return (objs[0].count, objs[0].shape) in HELD_OUT_COUNTS
    if spec.category == "position":
        return (frozenset(o.shape for o in objs), spec.relation) in HELD_OUT_POSITIONS
    return False


@functools.cache
def prompts(category: str, split: str = "train") -> tuple[PromptSpec, ...]:
    """Every distinct prompt of ``category`` in ``split`` ("train", "test" or "all"), in a fixed order."""
    specs = _all_prompts(category)
    if split == "all" or category == "single_object" and split in ("train", "test"):
        return tuple(specs)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, test or all")
    return tuple(s for s in specs if held_out(s) == (split == "test"))


def balanced_prompts(split: str = "test", seed: int = 0, per_category: int = 16) -> list[PromptSpec]:
    """A fixed list of ``per_category`` prompts of each category from ``split``, category by category.

    The evaluation list is the test split's; the ``mini`` calibration set is the train split's.
    A category's prompts are shuffled (seeded) and cycled when there are fewer than
    ``per_category``, so every distinct prompt appears as evenly as possible.
    """
    rng = np.random.default_rng(seed)
    out = []
    for category in CATEGORIES:
        pool = prompts(category, split)
        order = rng.permutation(len(pool))
        out += [pool[order[i % len(pool)]] for i in range(per_category)]
    return out


def relations(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> set[str]:
    """GenEval's relative position of box ``a`` to box ``b`` (x0, y0, x1, y1), y downwards.

    A relation holds when its component of the shrunk offset, over the offset's length, exceeds
    ``POSITION_CUT``.
    """
    boxes = np.array([a, b], dtype=float).reshape(2, 2, 2)  # [box, corner, xy]
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = boxes[:, 1] - boxes[:, 0]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    cut = POSITION_CUT
    return {name for name, hit in (("left of", dx < -cut), ("right of", dx > cut),
                                   ("above", dy < -cut), ("below", dy > cut)) if hit}


def _relation_cells(relation: str, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(row, col) of the first and second object: opposite ends of a random column (or row)."""
    k, far = int(rng.integers(GRID)), GRID - 1
    return {"above": [(0, k), (far, k)], "below": [(far, k), (0, k)],
            "left of": [(k, 0), (k, far)], "right of": [(k, far), (k, 0)]}[relation]


def scene_for(spec: PromptSpec, rng: np.random.Generator) -> tuple[Placed, ...]:
    """A random scene that satisfies ``spec``: free colours and cells (and sizes) drawn from ``rng``."""
    items = [(o.shape, o.color) for o in spec.objects for _ in range(o.count)]
    if spec.relation is None:
        cells = [divmod(int(c), GRID) for c in rng.choice(GRID * GRID, size=len(items), replace=False)]
    else:
        cells = _relation_cells(spec.relation, rng)
    placed = []
    for (shape, color), (row, col) in zip(items, cells):
        size = int(rng.choice(SIZES))
        pad = (CELL - size) // 2
        placed.append(Placed(shape, color or str(rng.choice(list(COLORS))), col * CELL + pad, row * CELL + pad, size))
    return tuple(placed)


@functools.cache
def _mask(shape: str, size: int) -> np.ndarray:  # [size, size] bool, sampled at pixel centres
    c = (np.arange(size) + 0.5) / size  # [size] in (0, 1)
    y, x = c[:, None], c[None, :]
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":
        # in half-pixels, exact and symmetric; the apex row is never empty (so the box is the drawn box)
        r, k = np.arange(size)[:, None], np.arange(size)[None, :]
        return np.abs(2 * k + 1 - size) <= r + 1
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: tuple[Placed, ...]) -> np.ndarray:
    """The scene as a [48, 48, 3] uint8 image: flat colours on white, no anti-aliasing."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for obj in scene:
        region = img[obj.y:obj.y + obj.size, obj.x:obj.x + obj.size]
        region[_mask(obj.shape, obj.size)] = COLORS[obj.color]
    return img


def sample(category: str, rng: np.random.Generator, split: str = "train") -> tuple[PromptSpec, tuple[Placed, ...]]:
    """A random prompt of ``category`` from ``split`` and a scene that shows it: (spec, scene)."""
    pool = prompts(category, split)
    spec = pool[int(rng.integers(len(pool)))]
    return spec, scene_for(spec, rng)


def with_drawn_colors(spec: PromptSpec, scene: tuple[Placed, ...]) -> PromptSpec:
    """``spec`` naming the colours its objects were drawn in (one object per ObjectSpec)."""
    return PromptSpec(spec.category, tuple(ObjectSpec(o.shape, o.count, p.color) for o, p in zip(spec.objects, scene)),
                      spec.relation)


def sample_training_batch(rng: np.random.Generator, batch: int) -> tuple[list[str], np.ndarray]:
    """``batch`` training scenes, categories drawn by ``TRAIN_WEIGHTS``: (captions, images [batch, 48, 48, 3] uint8).

    Half of the position scenes are captioned with the colours they were drawn in.
    """
    weights = np.array([TRAIN_WEIGHTS[c] for c in CATEGORIES], dtype=float)
    captions, images = [], []
    for category in rng.choice(CATEGORIES, size=batch, p=weights / weights.sum()):
        spec, scene = sample(str(category), rng)
        if category == "position" and rng.random() < 0.5:
            spec = with_drawn_colors(spec, scene)
        captions.append(spec.caption)
        images.append(render(scene))
    return captions, np.stack(images)
