"""diffusers quantizer for bitflux checkpoints: ``quant_method: bitflux`` in ``from_pretrained`` / ``save_pretrained``.

>>> import bitflux_cli                       # registers "bitflux" with diffusers (integrations.hooks)
>>> t = FluxTransformer2DModel.from_pretrained("out/flux-dev-1.58bit")   # or a hub id, or subfolder=
>>> t.save_pretrained("copy")                # config.json, the bitflux checkpoint, README.md (model card)
>>> t.push_to_hub("me/flux-dev-1.58bit")     # diffusers' push_to_hub; the card is bitflux's

Pre-quantized checkpoints only: passing ``BitfluxConfig()`` for a full-precision checkpoint is refused
(quantizing is ``bitflux quantize`` / ``pack`` / ``export --format diffusers``).

Loading (diffusers' ``ModelMixin.from_pretrained`` calls these hooks in this order):

- ``maybe_update_loaded_keys`` gets the weights file and opens it with bitflux's validating reader
  (``CheckpointFile``: format, version, codec, metadata, tensor list, dtypes and shapes). diffusers
  has already mapped the file with safetensors, but nothing it mapped is used: a header that
  safetensors itself cannot parse is refused by diffusers before bitflux sees it.
- ``_process_model_before_weight_loading`` checks config.json against the architecture recorded in
  the file and swaps the meta model's block linears for ``TernaryLinear`` shells (``loader.to_shells``):
  no full-precision block weight is ever allocated.
- ``maybe_update_state_dict`` replaces diffusers' state dict by the file's tensors read one at a
  time through ``CheckpointFile.read`` (sha256, ternary codes, positive finite scales), codes in the
  2-bit runtime layout (``loader.runtime_tensors``).
- ``create_quantized_param`` puts each layer's ``packed`` and ``scale`` (and ``residual_up`` /
  ``residual_down``, if the file has a residual, and ``rotation``, if it has one) in place as stored
  (uint8, fp32, bf16, int8); everything
  else (biases included) is diffusers' and follows ``torch_dtype``.
- ``_process_model_after_weight_loading`` refuses a load in which any of that did not happen.

Saving: ``get_state_dict_and_metadata`` turns the runtime tensors back into the checkpoint's
(``<m>.codes`` in the loaded codec, fp32 scales, every other tensor under its name) with the loaded
file's metadata and fresh per-tensor sha256s, which diffusers writes with safetensors. The model's
``save_pretrained`` then rewrites that file in bitflux's canonical layout (sorted header and tensors:
the same tensors and metadata give the same bytes) and writes README.md from its metadata; its
``_upload_folder``, which both push paths end in, puts the card back over diffusers' generic one.
"""

import json
import types
from enum import Enum
from pathlib import Path

import torch
from bitflux_kernels.ops import OPS
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..errors import ArtifactError, BitfluxError, UsageError

QUANT_METHOD = "bitflux"
CARD = "README.md"
# what this module overrides or calls in diffusers; register() refuses a diffusers without them
_QUANTIZER_HOOKS = ("maybe_update_loaded_keys", "maybe_update_state_dict", "check_if_quantized_param",
                    "create_quantized_param", "get_state_dict_and_metadata", "preprocess_model", "postprocess_model")
_HUB_METHODS = ("push_to_hub", "_upload_folder")  # PushToHubMixin's: both push paths end in _upload_folder


class DiffusersVersionError(BitfluxError):
    """The installed diffusers does not have the quantizer API this integration is written against."""


class BitfluxMethod(str, Enum):
    """diffusers reads ``quant_method.value``; its own ``QuantizationMethod`` enum cannot be extended."""

    BITFLUX = QUANT_METHOD


class BitfluxConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` for a bitflux transformer (written by ``bitflux export
    --format diffusers`` and by ``save_pretrained``).

    ``codec``: how the file stores codes ("2bit", "base3"; the runtime is always 2-bit);
    ``activations``: "none" (W2A16), "int8" or "fp8" (W2A8), the mode the ternary layers run in;
    ``method``: the quantization method, for people; ``dtype``: the model dtype the checkpoint stores
    (used when ``from_pretrained`` gets no ``torch_dtype``); ``format`` / ``format_version``: the
    checkpoint format's, checked again in the file itself.
    """

    _FIELDS = ("quant_method", "format", "format_version", "codec", "activations", "method", "dtype")

    def __init__(self, codec: str = "2bit", activations: str = "none", method: str | None = None,
                 dtype: str | None = None, format: str | None = None, format_version: int | None = None,
                 quant_method: str = QUANT_METHOD):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"BitfluxConfig: quant_method {quant_method!r}, expected {QUANT_METHOD!r}")
        if activations not in OPS:
            raise ValueError(f"BitfluxConfig: activations {activations!r}, expected one of {', '.join(OPS)}")
        if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"BitfluxConfig: dtype {dtype!r} is not a torch dtype")
        self.quant_method = BitfluxMethod.BITFLUX
        self.format, self.format_version, self.codec = format, format_version, codec
        self.activations, self.method, self.dtype = activations, method, dtype

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        unknown = sorted(set(config_dict) - set(cls._FIELDS))
        if unknown:
            raise ArtifactError(f"quantization_config has keys this bitflux does not know ({', '.join(unknown)}): "
                                "written by a newer bitflux?")
        return super().from_dict(config_dict, return_unused_kwargs, **kwargs)

    def to_diff_dict(self) -> dict:
        return self.to_dict()  # repr() calls it; diffusers' mixin (0.42) does not define it


class BitfluxQuantizer(DiffusersQuantizer):
    """Loads and saves bitflux checkpoints inside diffusers' ``from_pretrained`` / ``save_pretrained``."""

    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: BitfluxConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise UsageError("BitfluxConfig loads checkpoints bitflux has already quantized (config.json with "
                             "quantization_config.quant_method 'bitflux'); it does not quantize a full-precision "
                             "checkpoint on the fly: run `bitflux quantize`, `bitflux pack` and `bitflux export "
                             "--format diffusers OUT`, then load OUT")
        self.checkpoint = None  # CheckpointFile, opened in maybe_update_loaded_keys
        self._shapes = self._state = None
        self._placed: set[str] = set()

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in map(str, device_map.values()):
            raise UsageError("a bitflux transformer cannot be offloaded to disk by device_map (its packed weights "
                             "would bypass the quantizer); use enable_model_cpu_offload or group offload instead")

    def update_torch_dtype(self, torch_dtype):
        """Without ``torch_dtype`` the model takes the dtype its checkpoint stores, as ``bitflux generate`` does."""
        if torch_dtype is None and self.quantization_config.dtype:
            return getattr(torch, self.quantization_config.dtype)
        return torch_dtype

    def adjust_target_dtype(self, target_dtype):
        return torch.uint8

    @property
    def supports_parallel_loading(self) -> bool:
        return False

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        from ..checkpoint import CheckpointFile

        if len(checkpoint_files) != 1 or not str(checkpoint_files[0]).endswith(".safetensors"):
            raise ArtifactError(f"{checkpoint_files[0]}: a bitflux transformer is one safetensors file, not "
                                f"{len(checkpoint_files)} file(s) of this kind (was it saved with a small max_shard_size?)")
        self.checkpoint = CheckpointFile(Path(checkpoint_files[0]))
        return [_runtime_name(k, self.checkpoint.modules) for k in loaded_keys]

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=(), **kwargs):
        from ..loader import to_shells

        ckpt = self._require_checkpoint()
        recorded = ckpt.meta["architecture"]
        for key, value in recorded.items():
            if key in model.config and json.dumps(model.config[key]) != json.dumps(value):
                raise ArtifactError(f"{ckpt.path}: config.json has {key}={json.dumps(model.config[key])} but the "
                                    f"checkpoint was made for {key}={json.dumps(value)}")
        to_shells(model, ckpt, self.quantization_config.activations)
        self._shapes = {k: v.shape for k, v in model.state_dict().items()}
        return model

    def maybe_update_state_dict(self, state_dict: dict) -> dict:
        """The checkpoint's tensors, verified as they are read; diffusers' own mapping of the file is dropped."""
        from ..loader import runtime_tensors

        self._state = runtime_tensors(self._require_checkpoint(), self._shapes)
        return self._state

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        module, _, leaf = param_name.rpartition(".")
        return self.checkpoint is not None and leaf in _stored_leaves(self.checkpoint) and module in self.checkpoint.modules

    def create_quantized_param(self, model, param_value, param_name: str, target_device, state_dict=None,
                               unexpected_keys=None, **kwargs):
        """``packed`` (uint8), ``scale`` (fp32) and a residual (bf16) as stored: diffusers casts float tensors
        to the model dtype before this call, so the value is taken from the state dict, not from ``param_value``."""
        module, _, leaf = param_name.rpartition(".")
        stored = (state_dict or {}).get(param_name, param_value)
        model.get_submodule(module)._parameters[leaf] = torch.nn.Parameter(stored.to(target_device), requires_grad=False)
        self._placed.add(param_name)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ..ternary import TernaryLinear

        ckpt = self._require_checkpoint()
        expected = {f"{m}.{leaf}" for m in ckpt.modules for leaf in _stored_leaves(ckpt)}
        if self._state is None or expected - self._placed:
            raise DiffusersVersionError(_version_message("from_pretrained loaded a bitflux checkpoint without passing "
                                                         "its tensors through the bitflux quantizer's hooks"))
        on_meta = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
        if on_meta:
            raise ArtifactError(f"{ckpt.path}: tensor {on_meta[0]} was not loaded ({len(on_meta)} not loaded)")
        for layer in model.modules():
            if isinstance(layer, TernaryLinear):
                layer._resolve_backend()  # its parameters were assigned directly, not through _apply
        self._state, self._placed = None, set()
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        model._upload_folder = types.MethodType(_upload_folder, model)
        return model

    def get_state_dict_and_metadata(self, state_dict: dict, safe_serialization: bool = False):
        """The checkpoint's tensors and metadata for the runtime ``state_dict`` (see the module docstring)."""
        from ..checkpoint import pack, unpack
        from ..tensorfile import CHECKSUMS, tensor_sha256

        if not safe_serialization:
            raise UsageError("a bitflux transformer is saved as safetensors only: save_pretrained(..., "
                             "safe_serialization=True)")
        ckpt = self._require_checkpoint()
        out = {}
        for name, t in state_dict.items():
            module, _, leaf = name.rpartition(".")
            if module in ckpt.modules and leaf == "packed":
                codes = unpack(t.cpu(), ckpt.modules[module], "2bit") if ckpt.codec != "2bit" else None
                name, t = f"{module}.codes", t.cpu() if codes is None else pack(codes, ckpt.codec)
            elif name not in ckpt.file.entries:
                raise UsageError(f"{name} is not part of the bitflux checkpoint this model was loaded from (a LoRA "
                                 "adapter? unload it first: it cannot be fused into ternary weights)")
            out[name] = t.detach().cpu().contiguous()
        missing = sorted(set(ckpt.file.entries) - set(out))
        if missing:
            raise UsageError(f"the model no longer holds {missing[0]} of its bitflux checkpoint ({len(missing)} missing)")
        meta = {k: v for k, v in ckpt.file.metadata.items() if k != CHECKSUMS}
        meta["activations"] = self.quantization_config.activations
        meta[CHECKSUMS] = json.dumps({k: tensor_sha256(v) for k, v in out.items()}, sort_keys=True)
        return out, meta

    def _require_checkpoint(self):
        if self.checkpoint is None:
            raise DiffusersVersionError(_version_message("from_pretrained did not pass the weights file to "
                                                         "the quantizer (maybe_update_loaded_keys)"))
        return self.checkpoint

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _stored_leaves(ckpt) -> tuple[str, ...]:
    """The tensors of a ternary layer that keep their stored dtype, whatever ``torch_dtype`` says."""
    from ..checkpoint import RESIDUAL, ROTATION

    return ("packed", "scale") + (RESIDUAL if ckpt.residual_rank else ()) + ((ROTATION,) if ckpt.rotated else ())


def _runtime_name(name: str, modules: dict) -> str:
    module, _, leaf = name.rpartition(".")
    return f"{module}.packed" if leaf == "codes" and module in modules else name


def set_activations(model: torch.nn.Module, activations: str) -> None:
    """Run every ternary layer of a loaded model in ``activations`` mode ("none": W2A16, "int8" or
    "fp8": W2A8); ``save_pretrained`` records it."""
    from ..ternary import TernaryLinear

    if activations not in OPS:
        raise UsageError(f"activations {activations!r}: expected one of {', '.join(OPS)}")
    for layer in model.modules():
        if isinstance(layer, TernaryLinear):
            layer.activations = activations
    model.hf_quantizer.quantization_config.activations = activations


def weights_file(directory: Path, variant: str | None = None) -> Path:
    """The weights file ``save_pretrained`` writes in ``directory``."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from diffusers.utils.hub_utils import _add_variant

    return Path(directory) / _add_variant(SAFETENSORS_WEIGHTS_NAME, variant)


def write_card(weights: Path) -> Path:
    """README.md beside ``weights``: the model card made from that checkpoint's metadata."""
    from ..checkpoint import CheckpointFile
    from ..export.diffusers import model_card

    card = Path(weights).parent / CARD
    card.write_text(model_card(CheckpointFile(weights).meta, Path(weights).stat().st_size))
    return card


def canonicalize(path: Path) -> None:
    """Rewrite a checkpoint in bitflux's canonical layout (``write_tensorfile``), one verified tensor at a time."""
    from ..checkpoint import CheckpointFile
    from ..tensorfile import CHECKSUMS, write_tensorfile

    ckpt = CheckpointFile(path)
    specs = {name: (e.dtype, e.shape, lambda name=name: ckpt.read(name)) for name, e in ckpt.file.entries.items()}
    write_tensorfile(path, specs, {k: v for k, v in ckpt.file.metadata.items() if k != CHECKSUMS})


def _save_pretrained(self, save_directory, is_main_process: bool = True, save_function=None,
                     safe_serialization: bool = True, variant: str | None = None, max_shard_size=None,
                     push_to_hub: bool = False, **kwargs):
    """diffusers' ``save_pretrained`` (config.json and the weights through the quantizer), then the
    weights in bitflux's canonical layout and the model card. A bitflux checkpoint is one file:
    ``max_shard_size`` is not used."""
    from huggingface_hub import create_repo

    if kwargs.get("use_flashpack") or not safe_serialization:
        raise UsageError("a bitflux transformer is saved as safetensors only (safe_serialization=True, no FlashPack)")
    hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "create_pr", "token") if k in kwargs}
    self.hf_quantizer.quantization_config.dtype = str(self.dtype).removeprefix("torch.")  # as loaded or cast
    type(self).save_pretrained(self, save_directory, is_main_process=is_main_process, save_function=save_function,
                               safe_serialization=True, variant=variant, max_shard_size=1 << 62, **kwargs)
    if is_main_process:
        canonicalize(weights_file(save_directory, variant))
        write_card(weights_file(save_directory, variant))
    if push_to_hub:  # as diffusers' save_pretrained(push_to_hub=True) does, after the card is written
        repo_id = create_repo(hub.pop("repo_id", Path(save_directory).name), exist_ok=True,
                              private=hub.pop("private", None), token=hub.get("token")).repo_id
        self._upload_folder(save_directory, repo_id, **hub)


def _upload_folder(self, working_dir, repo_id, *args, **kwargs):
    """diffusers' push paths write their generic README.md just before uploading: put bitflux's card back."""
    weights = sorted(Path(working_dir).glob("diffusion_pytorch_model*.safetensors"))  # any variant
    if len(weights) == 1:
        write_card(weights[0])
    return type(self)._upload_folder(self, working_dir, repo_id, *args, **kwargs)


def _version_message(what: str) -> str:
    import diffusers

    return (f"{what}: diffusers {diffusers.__version__} is not the quantizer API bitflux's integration is written "
            "against (tested with diffusers 0.42); load with bitflux_cli.load_quantized_transformer instead, or "
            "install a diffusers version bitflux supports")


def register() -> None:
    """Map ``quant_method: bitflux`` to ``BitfluxConfig`` / ``BitfluxQuantizer`` in diffusers' tables.

    Idempotent. Raises ``DiffusersVersionError`` when diffusers lacks the tables or hooks used here,
    or already maps "bitflux" to a quantizer that is not this one.
    """
    import sys

    from diffusers.utils.hub_utils import PushToHubMixin

    auto = sys.modules.get("diffusers.quantizers.auto") or __import__("diffusers.quantizers.auto", fromlist=["_"])
    tables = [getattr(auto, n, None) for n in ("AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING")]
    lacking = [n for n, t in zip(("AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING"), tables)
               if not isinstance(t, dict)]
    lacking += [f"DiffusersQuantizer.{n}" for n in _QUANTIZER_HOOKS if not hasattr(DiffusersQuantizer, n)]
    lacking += [f"PushToHubMixin.{n}" for n in _HUB_METHODS if not hasattr(PushToHubMixin, n)]
    if lacking:
        raise DiffusersVersionError(_version_message(f"diffusers has no {', '.join(lacking)}"))
    for table, cls in zip(tables, (BitfluxQuantizer, BitfluxConfig)):
        current = table.get(QUANT_METHOD)
        if current is not None and (current.__module__, current.__name__) != (cls.__module__, cls.__name__):
            raise DiffusersVersionError(f"diffusers already maps quant_method {QUANT_METHOD!r} to "
                                        f"{current.__module__}.{current.__name__}: bitflux does not replace it")
        table[QUANT_METHOD] = cls


register()
