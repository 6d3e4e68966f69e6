"""Loading a 1.58-bit transformer: built on the meta device, packed weights assigned in place."""

from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

import bitflux_kernels

from .artifacts import STAGE_ARTIFACTS, artifact_path, require, stage_lock
from .checkpoint import CheckpointFile, model_dtype, to_runtime_2bit
from .config import Config, ModelConfig
from .console import info
from .errors import ArtifactError, UsageError
from .fusion import fuse_projections
from .models import EMBEDDED, build_meta_transformer, load_pipeline, place, resolve_device
from .ternary import replace_with_ternary, scoped_linears


def _shells(ckpt: CheckpointFile, model: ModelConfig | None, activations: str | None) -> torch.nn.Module:
    """The recorded architecture on the meta device, its quantized linears as ``TernaryLinear`` shells."""
    path, arch = ckpt.path, ckpt.meta["architecture"]
    if not arch:
        model = model or Config.model_validate(ckpt.meta["config"]).model
    try:
        transformer = build_meta_transformer(arch or model)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: a negative size, say
        raise ArtifactError(f"{path}: its recorded architecture does not build a FLUX transformer "
                            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
    to_shells(transformer, ckpt, activations or ckpt.meta["activations"])
    return transformer


def to_shells(transformer: torch.nn.Module, ckpt: CheckpointFile, activations: str) -> None:
    """Swap ``transformer``'s in-scope linears for ``TernaryLinear`` shells (with the checkpoint's residual
    rank and rotation), in place (meta works), after checking that they are exactly the checkpoint's quantized
    modules, with the same shapes."""
    expected = {name: (m.out_features, m.in_features) for name, m in scoped_linears(transformer)}
    if expected != ckpt.modules:
        missing = sorted(set(expected) ^ set(ckpt.modules)) or [n for n in expected if expected[n] != ckpt.modules[n]]
        raise ArtifactError(f"{ckpt.path}: quantized layers do not match the recorded architecture (e.g. {missing[0]})")
    replace_with_ternary(transformer, list(expected), activations, ckpt.residual_rank, ckpt.rotated)


def check_dense_tensors(ckpt: CheckpointFile) -> None:
    """Refuse a checkpoint whose tensors besides codes and scales are not those of its recorded
    architecture (a tensor missing, added or of another shape), naming the first that differs."""
    transformer = _shells(ckpt, None, None)
    shapes = {k: tuple(v.shape) for k, v in transformer.state_dict().items() if not k.endswith((".packed", ".scale"))}
    stored = {k: e.shape for k, e in ckpt.file.entries.items() if not k.endswith((".codes", ".scale"))}
    wrong = sorted(set(shapes) ^ set(stored)) or sorted(k for k in shapes if shapes[k] != stored[k])
    if wrong:
        raise ArtifactError(f"{ckpt.path}: tensor {wrong[0]} does not fit the recorded architecture "
                            f"(missing, unexpected or of another shape)")


def load_quantized_transformer(path: Path, model: ModelConfig | None = None, activations: str | None = None,
                               device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the FLUX transformer from a bitflux checkpoint without materialising FP weights.

    The architecture is the one recorded in the file (older files without it: ``model``, else the
    model config recorded in the file), so the base model need not be present. It is built on the
    meta device, its in-scope linears become ``TernaryLinear`` shells, and the stored tensors are
    read one at a time onto ``device`` (base-3 and int8 codecs re-encoded to the 2-bit runtime
    layout). ``activations`` overrides the recorded activation mode ("none", "int8" or "fp8").
    """
    ckpt = CheckpointFile(path)
    transformer = _shells(ckpt, model, activations)

    state = runtime_tensors(ckpt, {k: v.shape for k, v in transformer.state_dict().items()}, device)
    try:
        transformer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: does not match the recorded transformer ({str(exc).splitlines()[0]})") from None
    return transformer.eval()


def runtime_tensors(ckpt: CheckpointFile, wanted: dict[str, torch.Size], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``ckpt``, each verified as it is read (``CheckpointFile.read``), under the names of
    the module built from it (``wanted``: {state-dict name: shape}, ``TernaryLinear`` shells in place):
    ``<m>.codes`` becomes ``<m>.packed`` in the 2-bit runtime layout [N, Kp/4] uint8 (base-3 and int8
    re-encoded). A tensor the module does not hold, one of another shape, or one it lacks is refused."""
    state = {}
    for name in ckpt.names:
        module, _, leaf = name.rpartition(".")
        if leaf == "codes" and module in ckpt.modules:
            n, k = ckpt.modules[module]
            name, tensor = f"{module}.packed", to_runtime_2bit(ckpt.read(name), ckpt.codec, n, k)
        elif name in wanted:
            tensor = ckpt.read(name)
        else:
            raise ArtifactError(f"{ckpt.path}: tensor {name} is not part of the recorded architecture")
        if tuple(tensor.shape) != tuple(wanted.get(name, ())):
            raise ArtifactError(f"{ckpt.path}: tensor {name} has shape {list(tensor.shape)}, the model holds "
                                f"{list(wanted.get(name, ()))}")
        state[name] = tensor.to(device)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ArtifactError(f"{ckpt.path}: tensor {missing[0]} is missing ({len(missing)} missing)")
    return state


def packed_checkpoint(cfg: Config) -> Path:
    """The workdir's packed checkpoint.

    With the embedded model a missing checkpoint is made first (quantize, then pack, under their stage
    locks: about 2 minutes with block-recon), so ``bitflux generate`` works on a fresh install; with a
    real FLUX the error names the command.
    """
    path = artifact_path(cfg.workdir, "pack")
    if not path.exists() and cfg.model.source == EMBEDDED:
        from .packing import pack
        from .quantize import quantize

        with ExitStack() as locks:  # the stages it writes, as their own commands would hold them
            for stage in STAGE_ARTIFACTS:
                locks.enter_context(stage_lock(cfg.workdir, stage))
            if not path.exists():  # not made meanwhile by the run that held the locks
                info(f"{path} does not exist: quantizing ({cfg.quantization.method}) and packing the embedded model first")
                if not artifact_path(cfg.workdir, "quantize").exists():
                    quantize(cfg)
                pack(cfg)
    return require(cfg.workdir, "pack")


def runtime_activations(cfg: Config, ckpt: CheckpointFile) -> str:
    """The activation mode ``ckpt`` runs in: ``quantization.activations`` (``--activations``) when set,
    else the one the file records."""
    return cfg.quantization.activations or ckpt.meta["activations"]


def packed_transformer(cfg: Config, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The workdir's packed 1.58-bit transformer (``packed_checkpoint``), in ``runtime_activations``'s
    mode, its Q/K/V (and single blocks' MLP input) projections fused when ``model.fuse_projections`` says so."""
    path = packed_checkpoint(cfg)
    stored = model_dtype(CheckpointFile(path))  # of its dense tensors, whatever the configs that wrote it said
    if stored != cfg.model.dtype:
        raise UsageError(f"{path} holds a {stored} model, this run asks for model.dtype {cfg.model.dtype}: "
                         f"run it with --set model.dtype={stored} (or quantize and pack again in {cfg.model.dtype})")
    transformer = load_quantized_transformer(path, cfg.model, cfg.quantization.activations, device)
    if cfg.model.fuse_projections:
        fuse_projections(transformer)
    return transformer


@contextmanager
def pipeline_for(cfg: Config, full_precision: bool = False):
    """(pipeline, backend label) placed as ``model.offload`` says: the FP pipeline (its transformer
    read block by block, ``teacher.fp_pipeline``) or one with the workdir's packed 1.58-bit transformer."""
    from .teacher import fp_pipeline

    if full_precision:
        with fp_pipeline(cfg) as (pipe, _):
            yield pipe, "full-precision"
        return
    device = resolve_device(cfg.model)
    transformer = packed_transformer(cfg, device if cfg.model.offload == "none" else "cpu")
    yield place(load_pipeline(cfg.model, transformer), cfg.model), bitflux_kernels.select_backend(device)
