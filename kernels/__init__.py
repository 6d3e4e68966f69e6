"""bitflux ternary kernels: packed layouts, reference paths and the Triton GEMMs."""

# Installed as ``bitflux_kernels``. Where the repository root is on sys.path (``python -m pytest``,
# ``python -c`` there), this folder is also found as a top-level ``kernels``, and transformers and
# diffusers import that name to probe for Hugging Face's ``kernels`` package. It never runs its own
# modules under that name, since a second registration of ``torch.ops.bitflux.*`` would leave the first
# one's op handles dangling (``ops.py`` refuses to load under another name): where Hugging Face's package
# is installed (transformers 5.25 installs it) that package takes the name, as it would anywhere else
# (transformers then imports names from it); otherwise the name stays empty.
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)  # what ``import kernels`` returns
        _spec.loader.exec_module(sys.modules["kernels"])
elif __name__ == "bitflux_kernels":
    from .dispatch import BACKENDS, select_backend, ternary_linear
    from .hadamard import block_size, rotate_reference, rotate_torch, unrotate
    from .layout import pack_2bit, pack_base3, unpack_2bit, unpack_base3
    from .reference import ternary_linear_reference, ternary_linear_torch

    __all__ = [
        "BACKENDS",
        "select_backend",
        "ternary_linear",
        "pack_2bit",
        "unpack_2bit",
        "pack_base3",
        "unpack_base3",
        "ternary_linear_reference",
        "ternary_linear_torch",
        "block_size",
        "rotate_reference",
        "rotate_torch",
        "unrotate",
    ]
