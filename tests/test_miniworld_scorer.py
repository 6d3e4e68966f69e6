import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bitflux_cli.miniworld import scorer as s
from bitflux_cli.miniworld import world as w

NEAR_ZERO = 0.1  # the most a noise or constant image may score, overall and per category


def _renders(specs, rng, k=2):
    return [(spec, [w.render(w.scene_for(spec, rng)) for _ in range(k)]) for spec in specs]


def _degrade(img, rng, sigma=10.0, blur=1):
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.BoxBlur(blur)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0, sigma, img.shape), 0, 255).round().astype(np.uint8)


def _assert_all(result, floor):
    assert result["overall"] >= floor, result
    assert set(result["categories"]) == set(w.CATEGORIES)
    assert all(v >= floor for v in result["categories"].values()), result


def _assert_none(result):
    assert result["overall"] <= NEAR_ZERO, result
    assert all(v <= NEAR_ZERO for v in result["categories"].values()), result


def test_renders_of_eval_prompts_pass():
    result = s.evaluate(_renders(w.balanced_prompts(), np.random.default_rng(0), k=4))
    assert result["prompts"] == 96 and result["images_per_prompt"] == 4
    _assert_all(result, 0.98)


def test_renders_of_sampled_prompts_pass():
    rng = np.random.default_rng(1)
    specs = [w.sample(c, rng, "all")[0] for c in w.CATEGORIES for _ in range(50)]
    _assert_all(s.evaluate(_renders(specs, rng, k=1)), 0.98)


@pytest.mark.parametrize("blur", [1, 2])
def test_noisy_blurred_renders_pass(blur):
    """Gaussian noise of 10/255 and a box blur (3x3 or 5x5): the softness a generated image has."""
    rng = np.random.default_rng(2)
    pairs = [(spec, [_degrade(img, rng, blur=blur) for img in imgs])
             for spec, imgs in _renders(w.balanced_prompts(), rng, k=2)]
    _assert_all(s.evaluate(pairs), 0.95)


def test_colour_shift_tolerated():
    rng = np.random.default_rng(3)
    pairs = [(spec, [np.clip(img.astype(int) + rng.integers(-25, 26, 3), 0, 255).astype(np.uint8)
                     for img in imgs]) for spec, imgs in _renders(w.balanced_prompts(), rng)]
    _assert_all(s.evaluate(pairs), 0.98)


def test_noise_scores_zero():
    rng = np.random.default_rng(4)
    ev = w.balanced_prompts()
    uniform = [(spec, [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]) for spec in ev]
    _assert_none(s.evaluate(uniform))
    light = [(spec, [np.clip(rng.normal(220, 50, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(3)])
             for spec in ev]
    _assert_none(s.evaluate(light))


def test_constant_images_score_zero():
    colours = [w.BACKGROUND, (0, 0, 0), (128, 128, 128), *w.COLORS.values()]
    images = [np.full((64, 64, 3), c, np.uint8) for c in colours]
    _assert_none(s.evaluate([(spec, images) for spec in w.balanced_prompts()]))


def test_palette_speckle_scores_zero():
    """Scattered palette pixels on white (a model that learnt colours but not shapes) are no objects."""
    rng = np.random.default_rng(5)
    palette = np.array(list(w.COLORS.values()), np.uint8)
    pairs = []
    for spec in w.balanced_prompts():
        img = np.full((64, 64, 3), 255, np.uint8)
        m = rng.random((64, 64)) < 0.3
        img[m] = palette[rng.integers(0, 4, m.sum())]
        pairs.append((spec, [img]))
    _assert_none(s.evaluate(pairs))


def _one(spec, scene):
    return s.check(w.render(scene), spec)


def test_wrong_colour_fails():
    spec = w.PromptSpec("colors", (w.ObjectSpec("square", 1, "blue"),))
    assert _one(spec, (w.Placed("square", "blue", 20, 20, 16),)).ok
    verdict = _one(spec, (w.Placed("square", "green", 20, 20, 16),))
    assert not verdict.ok and "blue square" in verdict.reason
    spec2 = w.PromptSpec("color_attr", (w.ObjectSpec("circle", 1, "red"), w.ObjectSpec("square", 1, "green")))
    assert _one(spec2, (w.Placed("circle", "red", 5, 5, 16), w.Placed("square", "green", 28, 28, 16))).ok
    assert not _one(spec2, (w.Placed("circle", "green", 5, 5, 16), w.Placed("square", "red", 28, 28, 16))).ok


def test_wrong_shape_fails():
    spec = w.PromptSpec("single_object", (w.ObjectSpec("triangle"),))
    for shape in ("circle", "square"):
        assert not _one(spec, (w.Placed(shape, "red", 20, 20, 16),)).ok
    assert _one(spec, (w.Placed("triangle", "red", 20, 20, 16),)).ok


def test_wrong_relation_fails():
    rng = np.random.default_rng(6)
    for spec in w.prompts("position", "all"):
        assert _one(spec, w.scene_for(spec, rng)).ok
        for rel in [r for r in w.RELATIONS if r != spec.relation]:
            assert not _one(spec, w.scene_for(dataclasses.replace(spec, relation=rel), rng)).ok


def test_wrong_count_fails():
    rng = np.random.default_rng(7)
    for spec in w.prompts("counting", "all"):
        obj = spec.objects[0]
        assert _one(spec, w.scene_for(spec, rng)).ok
        for n in (1, obj.count - 1, obj.count + 1):
            other = dataclasses.replace(spec, objects=(dataclasses.replace(obj, count=n),))
            assert not _one(spec, w.scene_for(other, rng)).ok


def test_single_object_is_exact_but_two_object_is_not():
    one = w.PromptSpec("single_object", (w.ObjectSpec("circle"),))
    two_circles = (w.Placed("circle", "red", 5, 5, 16), w.Placed("circle", "blue", 28, 28, 16))
    assert not _one(one, two_circles).ok
    pair = w.PromptSpec("two_object", (w.ObjectSpec("circle"), w.ObjectSpec("square")))
    assert _one(pair, two_circles + (w.Placed("square", "red", 5, 30, 12),)).ok


def test_label_connectivity():
    classes = np.array([[1, 1, 0, 2],
                        [0, 1, 0, 2],
                        [1, 0, 2, 2],
                        [1, 1, -1, 1]])
    lab = s.label(classes)
    assert lab[0, 0] == lab[0, 1] == lab[1, 1] and lab[2, 0] == lab[3, 0] == lab[3, 1]
    assert lab[0, 0] != lab[2, 0]  # diagonal contact does not connect
    assert lab[0, 3] == lab[2, 2] and lab[3, 3] != lab[2, 3]  # same class only
    assert (lab[classes <= 0] == 0).all() and len(np.unique(lab[lab > 0])) == 4


def test_contact_sheet_layout():
    from bitflux_cli.miniworld.sheet import contact_sheet

    rng = np.random.default_rng(8)
    specs = w.balanced_prompts()[:5]
    images = [w.render(w.scene_for(spec, rng)) for spec in specs]
    sheet = contact_sheet(images, [spec.caption for spec in specs], cols=3, scale=2)
    arr = np.asarray(sheet)
    side = 2 * w.IMAGE_SIZE
    assert sheet.mode == "RGB" and sheet.width == 3 * (side + 4) + 4
    assert np.array_equal(arr[4:side + 4:2, 4:side + 4:2], images[0])  # nearest upscaling, first cell top-left
    assert (arr[side + 4:, :side + 8] < 100).all(-1).any()  # caption text under the first image
    with pytest.raises(ValueError):
        contact_sheet(images, ["one"], cols=3)


def test_standard_error_is_over_prompts_within_categories():
    # two categories of two prompts: variances 0.5 and 0 over prompts -> sqrt(0.5/2 + 0)/2
    assert s.overall_stderr({"a": [0.0, 1.0], "b": [0.5, 0.5]}) == pytest.approx(0.25)
    specs = w.balanced_prompts(per_category=4)
    blank = np.full((48, 48, 3), 255, np.uint8)
    rendered = {spec: imgs for spec, imgs in _renders(specs, np.random.default_rng(2), k=2)}
    result = s.evaluate([(spec, rendered[spec] if i % 2 else [blank, blank]) for i, spec in enumerate(specs)])
    by_category = {}
    for spec, p in zip(specs, result["per_prompt"]):
        by_category.setdefault(spec.category, []).append(p)
    assert result["overall_stderr"] == pytest.approx(s.overall_stderr(by_category)) and result["overall_stderr"] > 0
    assert sorted(set(result["per_prompt"])) == [0.0, 1.0]


def test_paired_error_is_the_error_of_the_per_prompt_differences():
    specs = w.balanced_prompts(per_category=4)
    rng = np.random.default_rng(0)
    a, b = rng.random(len(specs)).tolist(), rng.random(len(specs)).tolist()
    by_category = {}
    for spec, x, y in zip(specs, a, b):
        by_category.setdefault(spec.category, []).append(x - y)
    assert s.paired_stderr(specs, a, b) == pytest.approx(s.overall_stderr(by_category))
    assert s.paired_stderr(specs, a, a) == 0.0  # the same scores: no error in their difference
    with pytest.raises(ValueError):
        s.paired_stderr(specs, a, b[:-1])  # scores of other prompts
