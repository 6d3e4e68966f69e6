"""bitflux ternary kernels: packed layouts, reference paths and the Triton GEMMs."""

# Installed as ``bitflux_kernels``. Where the repository root is on sys.path (``python -m pytest``,
# ``python -c`` there), this folder is also found as a top-level ``kernels``, and transformers and
# diffusers import that name to probe for Hugging Face's ``kernels`` package: it then stays empty, since
# running its modules a second time would register ``torch.ops.bitflux.*`` again and leave the first
# registration's op handles dangling (``ops.py`` refuses to load under another name).
if __name__ == "bitflux_kernels":
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
