"""model.offload: the same image whether the weights sit on the device, move a component or a block at a time."""

import numpy as np
import pytest
from PIL import Image

from bitflux_cli.config import load_config
from bitflux_cli.generate import generate


@pytest.mark.parametrize("full_precision", [False, True], ids=["packed", "fp"])
def test_offload_modes_draw_the_same_image(tiny_chain, tmp_path, full_precision):
    images = {}
    for mode in ("none", "model", "sequential"):
        cfg = load_config("tiny", {"workdir": str(tiny_chain["workdir"]), "model.offload": mode, "model.device": "cpu",
                                   "generate.steps": 4})
        out = generate(cfg, "a red circle above a blue square", tmp_path / f"{mode}.png", full_precision)
        assert out["offload"] == mode
        images[mode] = np.asarray(Image.open(out["path"]))
    assert images["none"].std() > 0
    assert all(np.array_equal(images["none"], im) for im in images.values())
