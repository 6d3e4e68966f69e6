import numpy as np
import pytest

from bitflux_cli.miniworld import world as w


def test_vocab_is_exactly_the_caption_words():
    words = {word for c in w.CATEGORIES for spec in w.prompts(c, "all") for word in spec.caption.split()}
    assert words == set(w.VOCAB_WORDS)
    assert w.VOCAB_WORDS == sorted(w.VOCAB_WORDS) and all(x == x.lower() for x in w.VOCAB_WORDS)


def test_tokenizer_knows_every_word_and_splits_plurals():
    from bitflux_cli.miniworld import model

    tok = model.tokenizer()
    for word in w.VOCAB_WORDS:
        pieces = tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids)
        assert pieces == ([word[:-1], model.PLURAL] if word[:-1] in w.SHAPES else [word])


@pytest.mark.parametrize("spec,caption", [
    (w.PromptSpec("single_object", (w.ObjectSpec("circle"),)), "a circle"),
    (w.PromptSpec("two_object", (w.ObjectSpec("circle"), w.ObjectSpec("square"))), "a circle and a square"),
    (w.PromptSpec("counting", (w.ObjectSpec("triangle", 3),)), "three triangles"),
    (w.PromptSpec("colors", (w.ObjectSpec("square", 1, "blue"),)), "a blue square"),
    (w.PromptSpec("position", (w.ObjectSpec("circle"), w.ObjectSpec("square")), "left of"),
     "a circle left of a square"),
    (w.PromptSpec("color_attr", (w.ObjectSpec("circle", 1, "red"), w.ObjectSpec("square", 1, "green"))),
     "a red circle and a green square"),
])
def test_captions(spec, caption):
    assert spec.caption == caption


def test_split_holds_out_combinations():
    for c in w.CATEGORIES:
        train, test = set(w.prompts(c, "train")), set(w.prompts(c, "test"))
        assert train and test
        if c == "single_object":
            assert train == test
            continue
        assert not train & test and train | test == set(w.prompts(c, "all"))
        assert not any(w.held_out(s) for s in train) and all(w.held_out(s) for s in test)
    train_captions = {s.caption for c in w.CATEGORIES for s in w.prompts(c, "train")}
    for color, shape in w.HELD_OUT_COLOR_SHAPE:
        assert f"a {color} {shape}" not in train_captions
    for pair, rel in w.HELD_OUT_POSITIONS:  # both orders unseen with that relation, trained with others
        a, b = sorted(pair)
        assert f"a {a} {rel} a {b}" not in train_captions and f"a {b} {rel} a {a}" not in train_captions
        assert any(f"a {a} {other} a {b}" in train_captions for other in w.RELATIONS)
        assert any(f"a {b} {other} a {a}" in train_captions for other in w.RELATIONS)
    for n, shape in w.HELD_OUT_COUNTS:
        assert f"{w.NUMBERS[n]} {shape}s" not in train_captions
    for a, b in w.HELD_OUT_PAIRS:
        assert f"a {a} and a {b}" not in train_captions
    for spec in w.prompts("color_attr", "test"):  # unseen words together, each binding seen with others
        colors, shapes = {o.color for o in spec.objects}, {o.shape for o in spec.objects}
        assert not any(colors | shapes <= set(cap.split()) for cap in train_captions if " and " in cap)
        for o in spec.objects:
            assert any(f"{o.color} {o.shape}" in cap for cap in train_captions)
    # every word still occurs in training captions
    assert {word for cap in train_captions for word in cap.split()} == set(w.VOCAB_WORDS)


def test_eval_prompts_fixed_and_held_out():
    ev = w.balanced_prompts()
    assert len(ev) == 96 and ev == w.balanced_prompts("test", seed=0)
    assert ev != w.balanced_prompts("test", seed=1)
    for c in w.CATEGORIES:
        mine = [s for s in ev if s.category == c]
        test = set(w.prompts(c, "test"))
        assert len(mine) == 16 and set(mine) <= test and len(set(mine)) == min(16, len(test))


def test_sampling_is_deterministic():
    a = w.sample_training_batch(np.random.default_rng(7), 16)
    b = w.sample_training_batch(np.random.default_rng(7), 16)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert a[1].shape == (16, 48, 48, 3) and a[1].dtype == np.uint8
    c = w.sample_training_batch(np.random.default_rng(8), 16)
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("category", w.CATEGORIES)
def test_scenes_obey_spec(category):
    rng = np.random.default_rng(0)
    for _ in range(50):
        spec, scene = w.sample(category, rng, "test")
        assert spec in w.prompts(category, "test")
        img = w.render(scene)
        assert len(scene) == sum(o.count for o in spec.objects) <= 3
        cells = {(a.x // w.CELL, a.y // w.CELL) for a in scene}
        assert len(cells) == len(scene)  # one object a cell
        for a in scene:
            x0, y0, x1, y1 = a.box
            assert a.size in w.SIZES and x0 % w.CELL == y0 % w.CELL == (w.CELL - a.size) // 2  # centred in its cell
            assert x1 <= w.IMAGE_SIZE - 2 and y1 <= w.IMAGE_SIZE - 2
        if spec.relation:
            assert w.relations(scene[0].box, scene[1].box) == {spec.relation}
            (row_a, col_a), (row_b, col_b) = ((o.y // w.CELL, o.x // w.CELL) for o in scene)
            assert {abs(row_a - row_b), abs(col_a - col_b)} == {0, w.GRID - 1}  # opposite ends of a row or column
        colors = {tuple(p) for p in img.reshape(-1, 3)}
        assert colors <= {w.BACKGROUND, *w.COLORS.values()}  # flat colours, no anti-aliasing


def test_render_draws_the_shapes():
    img = w.render((w.Placed("square", "red", 2, 2, 16), w.Placed("circle", "blue", 26, 26, 20),
                    w.Placed("triangle", "green", 2, 26, 20)))
    red = (img == w.COLORS["red"]).all(-1)
    blue = (img == w.COLORS["blue"]).all(-1)
    green = (img == w.COLORS["green"]).all(-1)
    assert red.sum() == 256 and red[2:18, 2:18].all()
    assert abs(blue.sum() / 400 - np.pi / 4) < 0.03
    assert 0.5 < green.sum() / 400 < 0.6 and green[45, 2:22].all() and green[26, 11:13].all()
    assert not green[26, 2:11].any() and not green[26, 13:22].any()


def test_relations_follow_geneval():
    assert w.relations((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}
    assert w.relations((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    assert w.relations((30, 0, 40, 10), (0, 0, 10, 10)) == {"right of"}
    assert w.relations((0, 0, 10, 10), (30, 30, 40, 40)) == {"above", "left of"}
    assert w.relations((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # within the margin


def test_training_position_captions_may_name_colours():
    captions, _ = w.sample_training_batch(np.random.default_rng(0), 2000)
    relational = [c for c in captions if any(f" {r} " in c for r in w.RELATIONS)]
    colored = [c for c in relational if any(color in c for color in w.COLORS)]
    assert 0.4 < len(colored) / len(relational) < 0.6
    demo = w.PromptSpec("position", (w.ObjectSpec("triangle", 1, "green"), w.ObjectSpec("circle", 1, "yellow")), "left of")
    assert demo.caption == "a green triangle left of a yellow circle" and not w.held_out(demo)
    held_out_colors = {f"a {color} {shape}" for color, shape in w.HELD_OUT_COLOR_SHAPE}
    assert not held_out_colors & set(captions)


def test_training_favours_the_hard_categories():
    captions, _ = w.sample_training_batch(np.random.default_rng(0), 3000)
    counting = sum(c.split()[0] in w.NUMBERS.values() for c in captions)
    single = sum(c in ("a circle", "a square", "a triangle") for c in captions)
    assert 1.6 < counting / single < 2.5  # TRAIN_WEIGHTS: 2 to 1
