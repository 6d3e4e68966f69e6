import os

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA the Triton kernels run in the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests (``pytest -m gpu``) run only on CUDA with compiled kernels."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        skip = pytest.mark.skip(reason="needs compiled kernels: unset TRITON_INTERPRET")
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """A workdir where the tiny model went through quantize and pack (2-bit), shared by tests."""
    from bitflux_cli.config import load_config
    from bitflux_cli.packing import pack
    from bitflux_cli.quantize import quantize

    workdir = tmp_path_factory.mktemp("tiny-chain")
    cfg = load_config("tiny", {"workdir": str(workdir), "quantization.method": "absmean"})  # fast; the CLI chain runs the default
    return {"cfg": cfg, "quantize": quantize(cfg), "pack": pack(cfg), "workdir": workdir}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytest.mark.usefixtures``): two cores shared with other jobs, two threads per process thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    """A FLUX.1-dev-layout diffusers directory at full width with one double and one single block
    (``models.standin``), written once a session: about 7 s and 1.1 GB."""
    from bitflux_cli.models.standin import write_standin

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return write_standin(tmp_path_factory.mktemp("standin") / "FLUX.1-dev", double=1, single=1)
    finally:
        torch.set_num_threads(n)
