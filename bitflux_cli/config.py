"""One validated config for every stage: defaults < YAML file < command-line flags."""

import re
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DEVICE = re.compile(r"auto|cpu|mps|meta|cuda(:\d+)?")


class ModelConfig(_Section):
    source: str = "embedded"  # "embedded" (the bundled mini FLUX) or a Hugging Face hub id
    path: Path | None = None  # local diffusers directory; wins over the hub
    revision: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # "auto": cuda when present, else cpu; or one per pipeline component, e.g. {transformer: cuda:0, text_encoder_2: cpu}
    device: str | dict[Literal["transformer", "text_encoder", "text_encoder_2", "vae"], str] = "auto"
    # where the weights live while the pipeline runs: none (all on the device), model (one component
    # on the device at a time), sequential (one block/submodule at a time; the FP transformer is
    # streamed from its safetensors files)
    offload: Literal["none", "model", "sequential"] = "none"
    # the packed transformer's Q/K/V projections as one GEMM each, a single block's with its MLP input
    # (``fusion.fuse_projections``); exact; inference only: LoRAs target the separate layers
    fuse_projections: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        for name in (v.values() if isinstance(v, dict) else [v]):
            if not DEVICE.fullmatch(name):
                raise ValueError("expected a device: auto, cpu, cuda, cuda:N or mps")
        return v


class PromptsConfig(_Section):
    sets: list[str] = Field(default_factory=lambda: ["paper"], min_length=1)
    limit: StrictInt | None = Field(default=None, ge=1)
    seed: StrictInt = 0
    data_dir: Path | None = None


class CalibrationConfig(_Section):
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    steps: int = Field(default=28, ge=1)  # denoising steps of the teacher trajectories
    timesteps: int = Field(default=4, ge=1)  # sampled denoising steps recorded per prompt
    tokens: int = Field(default=256, ge=1)  # image tokens subsampled per recorded step
    shard_size: int = Field(default=32, ge=1)  # prompts per shard
    batch: int = Field(default=1, ge=1)  # prompts per pipeline call
    record_every: int = Field(default=1, ge=1)  # teacher calls and block outputs of every n-th prompt
    seed: int = 0


class ActAwareConfig(_Section):
    thresholds: int = Field(default=31, ge=2)  # candidate thresholds t = alpha * mean|w|, alpha in [0, max_alpha]
    max_alpha: float = Field(default=1.5, gt=0)


class BlockReconConfig(_Section):
    steps: int = Field(default=200, ge=0)  # Adam steps per block
    batch: int = Field(default=8, ge=1)  # recorded teacher calls per step
    scale_lr: float = Field(default=1e-3, gt=0)  # relative to each scale (scales are trained in log space)
    weight_lr: float = Field(default=1e-4, ge=0)  # latent weights through the STE; 0 learns the scales only
    # Adam on the residual's factors (quantization.residual_rank > 0); 0 keeps its start fit. Recorded
    # only when changed, so files without a residual keep their bytes
    residual_lr: float = Field(default=1e-3, ge=0, exclude_if=lambda lr: lr == 1e-3)
    context_weight: float = Field(default=1.0, ge=0)  # text-stream output loss (vs the FP block on the same inputs); 0: image stream only
    inputs: Literal["quantized", "fp"] = "quantized"  # a block's inputs: the quantized chain's activations, or the FP chain's
    # the codes: "ste", threshold codes of latent weights trained through the straight-through estimator; "adaround",
    # each weight's choice between its two neighbouring grid points learned soft and annealed to hard (AdaRound, as
    # BRECQ runs it: no penalty for the first 20% of the steps, then its exponent from 20 to 2). Recorded only
    # when changed, as are its two settings, so files made with the default keep their bytes
    rounding: Literal["ste", "adaround"] = Field(default="ste", exclude_if=lambda r: r == "ste")
    rounding_lr: float = Field(default=1e-1, gt=0, exclude_if=lambda lr: lr == 1e-1)  # Adam on AdaRound's v
    rounding_weight: float = Field(default=1.0, ge=0, exclude_if=lambda w: w == 1.0)  # its penalty, vs the relative output error
    seed: int = 0


class DistillConfig(_Section):
    mode: Literal["full", "blockwise"] = "full"  # full: all blocks at once (FSDP under torchrun); blockwise: one block at a time
    init: Literal["absmean", "block-recon"] = "absmean"  # the student's start: absmean, or block-recon's result (runs it first)
    steps: int = Field(default=200, ge=0)  # full: Adam steps
    block_steps: int = Field(default=50, ge=1)  # blockwise: Adam steps per visit of a block
    rounds: int = Field(default=1, ge=1)  # blockwise: passes over all blocks
    batch: int = Field(default=4, ge=1)  # recorded teacher calls per step, over all ranks (divisible by their number)
    scale_lr: float = Field(default=1e-3, gt=0)
    weight_lr: float = Field(default=1e-4, ge=0)
    save_every: int = Field(default=50, ge=1)  # steps between checkpoints in <workdir>/distill/
    gradient_checkpointing: bool = False
    seed: int = 0


class QuantizationConfig(_Section):
    method: Literal["absmean", "act-aware", "block-recon", "distill"] = "absmean"
    # W2A16 ("none") or W2A8 ("int8", "fp8"). Unset: quantize records "none", pack carries what the
    # ternary file records, and generate / eval / bench run in the mode the packed file records
    activations: Literal["none", "int8", "fp8"] | None = None
    eval_prompts: int = Field(default=4, ge=1)  # prompts of the fidelity report
    # host memory for the activations that walk the blocks with the student (block-recon's recorded
    # calls); past it, block-recon uses the first calls that fit and says so
    activation_budget_gb: float = Field(default=16.0, gt=0)
    # optional quality knob, off by default: per linear a rank-r bf16 correction up [N, r] @ down [r, K]
    # of the ternary weight (SVD of its error, residual.py), stored beside it and run as one more small
    # GEMM pair; costs 2 r (N + K) bytes a linear. Recorded in the config only when set, so r = 0 files
    # keep their bytes
    residual_rank: StrictInt = Field(default=0, ge=0, exclude_if=lambda r: r == 0)
    # optional, off by default: codes of W R, an online randomized Hadamard rotation of each linear's
    # input in front of the GEMM (rotation.py); format version 3. Recorded only when set
    rotation: Literal["none", "hadamard"] = Field(default="none", exclude_if=lambda r: r == "none")
    act_aware: ActAwareConfig = Field(default_factory=ActAwareConfig)
    block_recon: BlockReconConfig = Field(default_factory=BlockReconConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


class PackConfig(_Section):
    codec: Literal["2bit", "base3"] = "2bit"


# torch's CPU generator seeds its Mersenne Twister with the low 32 bits: 2**32 would draw seed 0's image
MAX_SEED = 2**32 - 1
MAX_SIDE = 4096  # pixels: 256 x 256 latent tokens; well past what FLUX was trained for


def image_side(v: int) -> int:
    """``v`` when it is an image side FLUX can draw: a multiple of 16 in [16, MAX_SIDE] (the VAE's 8x
    and the 2x2 patches), else a ValueError naming the nearest valid ones."""
    if 16 <= v <= MAX_SIDE and v % 16 == 0:
        return v
    near = min(max(v, 16), MAX_SIDE)
    lo, hi = near // 16 * 16, -(-near // 16) * 16
    nearest = " or ".join(str(n) for n in sorted({max(lo, 16), min(hi, MAX_SIDE)}))
    raise ValueError(f"must be a multiple of 16 in [16, {MAX_SIDE}]; nearest valid: {nearest}")


class GenerateConfig(_Section):
    # Strict: YAML ``steps: true`` or ``guidance: yes`` is a mistake, not 1.
    height: StrictInt = 1024  # a multiple of 16 in [16, MAX_SIDE]: the VAE's 8x and the 2x2 patches
    width: StrictInt = 1024
    steps: StrictInt = Field(default=28, ge=1)
    guidance: StrictFloat = Field(default=3.5, allow_inf_nan=False)
    seed: StrictInt = Field(default=0, ge=0, le=MAX_SEED)
    max_sequence_length: StrictInt = Field(default=512, ge=1, le=512)  # FluxPipeline's T5 limit

    @field_validator("height", "width")
    @classmethod
    def _side(cls, v: int) -> int:
        return image_side(v)


class BenchConfig(_Section):
    gpu: str | None = None
    resolutions: list[StrictInt] = Field(default_factory=lambda: [512, 1024], min_length=1)  # square sides, as generate's

    @field_validator("resolutions")
    @classmethod
    def _sides(cls, v: list[int]) -> list[int]:
        return [image_side(r) for r in v]
    batch: int = Field(default=1, ge=1)
    warmup: int = Field(default=3, ge=0)
    iters: int = Field(default=20, ge=1)
    # measured steps through torch.compile(fullgraph=True) in this mode ("reduce-overhead": with CUDA
    # graphs), the FP baseline and the ternary modes alike; compilation happens in the warm-up
    compile: Literal["none", "default", "max-autotune-no-cudagraphs", "reduce-overhead"] = "none"


class EvalConfig(_Section):
    # mini: the miniature world's scorer; geneval / t2i-compbench: images for the official evaluators (eval_suites)
    suite: Literal["mini", "geneval", "t2i-compbench"] = "mini"
    split: Literal["test", "train"] = "test"  # held-out prompts, or training prompts (fit vs generalisation)
    per_category: int = Field(default=16, ge=1)  # prompts of the split per GenEval category
    images_per_prompt: int = Field(default=4, ge=1)
    seed: StrictInt = Field(default=0, ge=0, le=MAX_SEED)
    batch: int = Field(default=64, ge=1)
    limit: StrictInt | None = Field(default=None, ge=1)  # geneval / t2i-compbench: the first N prompts (of each category)


class Config(_Section):
    workdir: Path = Path("runs/tiny")

    @field_validator("workdir", mode="before")
    @classmethod
    def _workdir(cls, v):
        if isinstance(v, str) and not v.strip():
            raise ValueError("is empty: name a directory (\".\" for the current one)")
        return Path(v).expanduser() if isinstance(v, (str, Path)) else v
    model: ModelConfig = Field(default_factory=ModelConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def resolved(self) -> dict:
        """The whole config as plain JSON-able data, for artifact metadata."""
        return self.model_dump(mode="json")


DEFAULT_CONFIG = "tiny"


def bundled_configs() -> list[str]:
    """Names of the configs shipped with bitflux."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("bitflux_cli.configs").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config_path(name: str) -> Path:
    """A path as given, else the bundled config of that name (``flux-dev`` or ``flux-dev.yaml``)."""
    if not name.strip():
        raise ConfigError(f"--config is empty: give a config file or a bundled config ({', '.join(bundled_configs())})")
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{name}: is a directory, not a config file")
    bundled = resources.files("bitflux_cli.configs") / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.is_file():
        return Path(str(bundled))
    raise ConfigError(f"{name}: no such config file, and not a bundled config (bundled: {', '.join(bundled_configs())})")


def _clip(text: str, limit: int = 80) -> str:
    """``text`` on one line (control characters escaped: an error stays one line), cut to ``limit``."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value: Any, limit: int = 80) -> str:
    return _clip(repr(value), limit)


def _dotted(loc: tuple) -> str:
    return ".".join(p if isinstance(p, str) and p.isprintable() and p.strip() == p and p else _short(p, 40) for p in loc)


def _describe(error: dict) -> str:
    key = _dotted(error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    msg = error["msg"].removeprefix("Value error, ")  # a validator's own message says what is wrong
    return f"{key}: {msg[:1].lower() + msg[1:]} (got {_short(error.get('input'))})"


def _is_branch(part) -> bool:  # a union member's tag in an error's loc ("str", "dict[...]"), not a key
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _first_error(errors: list[dict]) -> dict:
    """The error to report: the first, with a union's members folded into one: the member the value's
    type matched (its own error, e.g. an unknown key), else "should be A or B" over all of them."""
    first = errors[0]
    field = first["loc"][:next((i for i, p in enumerate(first["loc"]) if _is_branch(p)), len(first["loc"]))]
    members = [e for e in errors if e["loc"][:len(field)] == field and len(e["loc"]) > len(field)
               and _is_branch(e["loc"][len(field)])]
    if not members:
        return first
    matched = [e for e in members if not e["type"].endswith("_type")]
    if matched:
        return {**matched[0], "loc": tuple(p for p in matched[0]["loc"] if not _is_branch(p))}
    wanted = " or ".join(e["msg"].removeprefix("Input should be ") for e in members)
    return {**first, "loc": field, "type": "union", "msg": f"Input should be {wanted}"}


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that gives one key twice (plain YAML keeps the last one silently)."""

    def __init__(self, key: Any, line: int):
        super().__init__(f"key {_short(key, 40)} appears twice in one mapping (line {line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys; keys brought in by a ``<<`` merge may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: the base class says so
                    continue
                if duplicate:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2's floats: PyYAML follows YAML 1.1, where a float needs a dot, so ``1e-3`` was the string "1e-3"
# (refused by a strict float field such as generate.guidance). Exponents without a dot are floats here.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    """``text`` read as YAML with safe types only and no duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_error(exc: Exception) -> str:
    """One line for a YAML error: the problem and where, not the multi-line context dump."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}" if exc.problem_mark else ""
        return _clip(f"{exc.problem}{where}", 160)
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    lines = str(exc).strip().splitlines()
    return _clip(lines[0], 160) if lines else type(exc).__name__


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
        if not isinstance(data, dict):
            raise ConfigError(f"command line: {key}: {p} is a value, not a section")
    data[leaf] = value


# What reading YAML may raise besides YAMLError: bad dates (2001-13-01) are ValueErrors, deep nesting
# a RecursionError.
_YAML_FAILURES = (yaml.YAMLError, ValueError, OverflowError, RecursionError)


def load_config(name: str | None = None, overrides: dict[str, Any] | None = None,
                assignments: dict[str, Any] | None = None) -> Config:
    """Load a config by path or bundled name, apply dotted ``assignments`` (``--set``, null included)
    and ``overrides`` (named flags; None: not given), validate.

    Raises ``ConfigError`` with one line naming the file (or the command line, for a value given
    there), the key and what was expected.
    """
    path = resolve_config_path(DEFAULT_CONFIG if name is None else name)
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable UTF-8 file ({_clip(str(exc), 120)})") from None
    except _YAML_FAILURES as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_error(exc)})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    given = (assignments or {}) | {key: value for key, value in (overrides or {}).items() if value is not None}
    for key, value in given.items():
        _set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        error = _first_error(exc.errors())
        loc = ".".join(str(p) for p in error["loc"])
        given_here = any(k == loc or k.startswith(f"{loc}.") or loc.startswith(f"{k}.") for k in given)
        raise ConfigError(f"{'command line' if given_here else path}: {_describe(error)}") from None


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` flags as dotted overrides, each value read as YAML (``4000``, ``true``, ``[mini]``)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {_clip(item)}: expected KEY=VALUE, e.g. --set quantization.block_recon.steps=4000")
        try:
            parsed = _yaml(value)
        except DuplicateKeyError as exc:
            raise ConfigError(f"--set {_clip(item)}: {exc}") from None
        except _YAML_FAILURES as exc:
            raise ConfigError(f"--set {_clip(item)}: the value is not YAML ({_yaml_error(exc)})") from None
        # a text field takes the text as typed: model.revision=1234e56 is not a float, workdir=123 not an int
        out[key.strip()] = value.strip() if parsed is not None and not isinstance(parsed, str) \
            and _is_text_field(key.strip()) else parsed
    return out


def _is_text_field(key: str) -> bool:
    """Whether the dotted ``key`` names a ``Config`` field that holds only text: str, Path, or either or None."""
    model, annotation = Config, None
    for part in key.split("."):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        model = annotation = field.annotation
    kinds = (set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}) - {type(None)}
    return bool(kinds) and kinds <= {str, Path}
