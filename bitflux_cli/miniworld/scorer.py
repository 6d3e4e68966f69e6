"""GenEval for the miniature world, with geometry in place of a detector.

A pixel takes a palette colour when it lies near the RGB segment from white to that colour and at
least halfway along it (``MAX_RESIDUAL``), so a blurred edge is cut at its middle; it is background
within ``MAX_WHITE_DISTANCE`` of white, and nothing otherwise. Same-colour pixels form 4-connected
blobs; blobs smaller than ``MIN_AREA`` (noise, fringes) or larger than ``MAX_AREA`` (no object is
that big) are not objects. A blob's shape comes from its box: a square fills it (~1.0), a circle
~0.785, a triangle ~0.5 and is bottom-heavy; a blob matching none, or far from square, has no
shape and is not an object. An image whose background covers less than ``MIN_BACKGROUND`` fails
outright, so a constant colour or noise cannot pass as one huge object.

A spec then holds as in GenEval: each named object is found at least ``count`` times with its
colour, exactly ``count`` times for ``single_object`` and ``counting`` (any colour counted), and
for ``position`` every found first object has the relation to every found second object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .world import BACKGROUND, COLORS, SIZES, PromptSpec, relations

PALETTE_NAMES = (None, *COLORS)  # index 0 is the background
_WHITE = np.array(BACKGROUND, dtype=np.float32)
_TO_COLOR = np.array(list(COLORS.values()), dtype=np.float32) - _WHITE  # [4, 3]
MAX_RESIDUAL = 60.0  # RGB distance off the white-to-colour segment; colours are >= 160 apart
MAX_WHITE_DISTANCE = 100.0
MIN_AREA = 30  # the smallest object (a 12 px triangle) has 84 pixels
MAX_AREA = 2 * max(SIZES) ** 2
MIN_BACKGROUND = 0.5  # three 12 px squares leave 81 % background


@dataclass(frozen=True)
class Blob:
    """A detected object: colour, shape, pixel area, box (x0, y0, x1, y1), x1/y1 exclusive."""

    color: str
    shape: str
    area: int
    box: tuple[int, int, int, int]


@dataclass
class Verdict:
    """The outcome of one image against one spec, and why."""

    ok: bool
    reason: str
    objects: list[Blob] = field(default_factory=list)
    background: float = 0.0


def palette_classes(image: np.ndarray) -> np.ndarray:
    """[H, W] int: 0 background, 1.. ``COLORS`` in order, -1 for a pixel that is neither.

    A pixel belongs to colour k when it lies near the segment from white to k, at least halfway
    to k: a blurred edge is then cut at its middle and a blurred shape keeps its outline.
    """
    p = image.astype(np.float32) - _WHITE  # [H, W, 3]
    alpha = np.clip(p @ _TO_COLOR.T / (_TO_COLOR ** 2).sum(-1), 0, 1)  # [H, W, 4]
    resid = np.linalg.norm(p[..., None, :] - alpha[..., None] * _TO_COLOR, axis=-1)  # [H, W, 4]
    best = resid.argmin(-1)
    a, r = np.take_along_axis(alpha, best[..., None], -1)[..., 0], resid.min(-1)
    colored = (a >= 0.5) & (r <= MAX_RESIDUAL)
    near_white = np.linalg.norm(p, axis=-1) <= MAX_WHITE_DISTANCE
    return np.where(colored, best + 1, np.where(near_white, 0, -1))


def label(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal positive classes: [H, W] labels, 0 where ``classes <= 0``.

    Each pixel repeatedly takes the smallest label among itself and its same-class neighbours,
    with pointer jumping (label = pixel index + 1, so a label can follow its own pixel's label).
    """
    h, w = classes.shape
    fg = classes > 0
    big = h * w + 1
    lab = np.where(fg, np.arange(1, h * w + 1).reshape(h, w), 0)
    pad_cls = np.pad(classes, 1, constant_values=-2)
    same = [pad_cls[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == classes
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    while True:
        pad = np.pad(np.where(fg, lab, big), 1, constant_values=big)
        new = lab.copy()
        for (dy, dx), s in zip(((-1, 0), (1, 0), (0, -1), (0, 1)), same):
            nb = pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
            new = np.where(fg & s, np.minimum(new, nb), new)
        flat = new.ravel()
        new = np.where(fg, flat[np.maximum(new, 1) - 1], 0)  # pointer jumping
        if np.array_equal(new, lab):
            return lab
        lab = new


def shape_of(mask: np.ndarray) -> str | None:
    """The shape of a blob cropped to its box ([h, w] bool), or None if it is none of ours."""
    h, w = mask.shape
    if max(h, w) > 1.5 * min(h, w):
        return None
    fill = mask.sum() / (h * w)
    top_heavy = mask[: h // 2].sum() / max(1, mask[(h + 1) // 2:].sum())  # a triangle's is 1/3
    if top_heavy < 0.75 and 0.4 <= fill <= 0.78:
        return "triangle"
    if not 0.8 <= top_heavy <= 1.25:
        return None
    if fill >= 0.85:  # a 5x5 blur rounds a 12 px square's corners down to ~0.9
        return "square"
    if fill >= 0.62:  # a circle fills 0.785, blurred 12 px ones ~0.7
        return "circle"
    return None


def detect(image: np.ndarray) -> tuple[list[Blob], float]:
    """The objects in a [H, W, 3] uint8 image and the fraction of background pixels."""
    classes = palette_classes(image)
    background = float((classes == 0).mean())
    labels = label(classes)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    blobs = []
    for i, area in zip(ids, areas):
        if not MIN_AREA <= area <= MAX_AREA:
            continue
        ys, xs = np.nonzero(labels == i)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        shape = shape_of(labels[y0:y1, x0:x1] == i)
        if shape is not None:
            color = PALETTE_NAMES[classes[ys[0], xs[0]]]
            blobs.append(Blob(color, shape, int(area), (int(x0), int(y0), int(x1), int(y1))))
    return blobs, background


def check(image: np.ndarray, spec: PromptSpec) -> Verdict:
    """Whether ``image`` shows ``spec`` (GenEval's rules, see the module docstring), with the reason."""
    blobs, background = detect(image)
    verdict = Verdict(False, "", blobs, background)
    if background < MIN_BACKGROUND:
        verdict.reason = f"background covers {background:.0%} < {MIN_BACKGROUND:.0%}"
        return verdict
    found = []
    for obj in spec.objects:
        same_shape = [b for b in blobs if b.shape == obj.shape]
        matches = [b for b in same_shape if obj.color is None or b.color == obj.color]
        if len(matches) < obj.count:
            verdict.reason = f"{obj.phrase}: found {len(matches)} ({len(same_shape)} {obj.shape} of any colour)"
            return verdict
        if spec.exact and len(same_shape) != obj.count:
            verdict.reason = f"{obj.phrase}: expected exactly {obj.count} {obj.shape}, found {len(same_shape)}"
            return verdict
        found.append(matches)
    if spec.relation is not None:
        for a in found[0]:
            for b in found[1]:
                if spec.relation not in (rel := relations(a.box, b.box)):
                    verdict.reason = f"{a.shape} at {a.box} is {sorted(rel)} of {b.shape} at {b.box}, not {spec.relation}"
                    return verdict
    verdict.ok, verdict.reason = True, "ok"
    return verdict


def score(image: np.ndarray, spec: PromptSpec) -> bool:
    """Whether ``image`` shows ``spec``; ``check`` says why."""
    return check(image, spec).ok


def evaluate(images_by_prompt: Mapping[PromptSpec, list[np.ndarray]]
             | Iterable[tuple[PromptSpec, list[np.ndarray]]]) -> dict:
    """GenEval-style summary over (spec, images) pairs (a repeated spec may appear more than once).

    A category's score is the mean correctness of its images; ``overall`` is the mean of the
    category scores. ``overall_stderr`` is its standard error over prompts (a prompt's images are
    one sample: they share its difficulty), ``per_prompt`` each prompt's fraction correct, in order.
    """
    pairs = list(images_by_prompt.items() if isinstance(images_by_prompt, Mapping) else images_by_prompt)
    per_prompt = [float(np.mean([score(img, spec) for img in images])) for spec, images in pairs]
    per_category: dict[str, list[float]] = {}
    for (spec, _), p in zip(pairs, per_prompt):
        per_category.setdefault(spec.category, []).append(p)
    categories = {c: float(np.mean(v)) for c, v in per_category.items()}
    return {"overall": float(np.mean(list(categories.values()))), "overall_stderr": overall_stderr(per_category),
            "categories": categories, "prompts": len(pairs),
            "images_per_prompt": sum(len(images) for _, images in pairs) / len(pairs), "per_prompt": per_prompt}


def paired_stderr(specs: Sequence[PromptSpec], a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of overall(a) - overall(b), from two models' per-prompt scores on the same ``specs`` and seeds."""
    per_category: dict[str, list[float]] = {}
    for spec, x, y in zip(specs, a, b, strict=True):
        per_category.setdefault(spec.category, []).append(x - y)
    return overall_stderr(per_category)


def overall_stderr(per_category: Mapping[str, Sequence[float]]) -> float:
    """Standard error of the mean of category means, from per-prompt scores (or per-prompt differences
    of two models on the same prompts and seeds: the paired error of a difference)."""
    variances = [np.var(v, ddof=1) / len(v) if len(v) > 1 else 0.0 for v in per_category.values()]
    return float(np.sqrt(np.sum(variances)) / len(variances))
