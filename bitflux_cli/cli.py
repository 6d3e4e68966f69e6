"""The ``bitflux`` command: parses flags, loads the config, calls one stage, prints the result."""

import importlib
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .artifacts import check_stage_dirs, check_writable_dir, require, stage_lock
from .config import load_config, parse_assignments
from .console import console
from .distributed import launch_rank
from .errors import BitfluxError

app = typer.Typer(help="1.58-bit FLUX: calibrate, quantize, pack, generate and benchmark a ternary FLUX transformer.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="Config file, or a bundled config name (tiny, flux-dev, flux-schnell). Default: tiny (the embedded model).")]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", "-w", help="Work directory holding each stage's artifact (overrides `workdir`).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout; logs and progress go to stderr.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Set any config value, KEY=VALUE (YAML), e.g. --set quantization.block_recon.steps=4000; repeatable.")]
ActivationsOpt = Annotated[Optional[str], typer.Option("--activations", help="none (W2A16), int8 or fp8 (W2A8, per-token dynamic int8 / float8 e4m3); overrides quantization.activations.")]


def _run(stage, config: str | None, overrides: dict, as_json: bool, *args, sets: list[str] | None = None,
         writes: tuple[str, ...] = (), needs: str | None = None) -> None:
    """Load the config (``sets``: ``--set`` flags), run one stage, print its result; errors become one line and an exit code.

    ``writes``: the workdir stages the command may write. The workdir is checked first (a file, or
    not writable: exit 2), and, when the workdir does not exist yet, the artifact of the stage it
    ``needs`` (missing then: exit 2, before the lock would create the workdir); then each of those
    stages is locked (``artifacts.stage_lock``) while the stage runs, so a second run on them exits
    at once (1). Under torchrun rank 0 holds the locks.
    """
    try:
        cfg = load_config(config, overrides, parse_assignments(sets))
        with ExitStack() as locks:
            if writes:
                check_writable_dir(cfg.workdir, "--workdir")
                check_stage_dirs(cfg.workdir, writes)
            if needs and not Path(cfg.workdir).exists():  # nothing to lock in: say so before the lock makes it
                require(cfg.workdir, needs)
            if launch_rank() == 0:
                for name in writes:
                    locks.enter_context(stage_lock(cfg.workdir, name))
            result = stage(cfg, *args)
    except BitfluxError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except Exception as exc:  # an unexpected failure still gets one line, not a traceback
        if os.environ.get("BITFLUX_DEBUG"):
            raise
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        console.print(f"[red]error:[/red] {type(exc).__name__}: {cause} (set BITFLUX_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if launch_rank() != 0:  # under torchrun, rank 0 speaks for the job
        return
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        _summary(result)


def _summary(result: dict) -> None:
    table = Table(show_header=False, box=None)
    for key, value in result.items():
        if not isinstance(value, (dict, list)):
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            table.add_row(f"[bold]{key}[/bold]", text if len(text) <= 200 else f"{text[:197]}...")  # a 30k-character prompt
    console.print(table)


@app.command()
def calibrate(config: ConfigOpt = None, workdir: WorkdirOpt = None, as_json: JsonOpt = False, sets: SetOpt = None,
              limit: Annotated[Optional[int], typer.Option(help="Calibrate on a seeded subset of this many prompts.")] = None):
    """Run the FP model over the calibration prompts and record what the quantizer needs (resumable)."""
    _run(_lazy("calibrate", "calibrate"), config, {"workdir": workdir, "calibration.prompts.limit": limit}, as_json, sets=sets, writes=("calibrate",))


@app.command()
def quantize(config: ConfigOpt = None, workdir: WorkdirOpt = None, as_json: JsonOpt = False, sets: SetOpt = None,
             method: Annotated[Optional[str], typer.Option(help="Quantization method; overrides quantization.method.")] = None,
             activations: ActivationsOpt = None):
    """Quantize the transformer's block linears to ternary codes and report fidelity vs FP."""
    _run(_quantize, config, {"workdir": workdir, "quantization.method": method, "quantization.activations": activations}, as_json, sets=sets,
         writes=("calibrate", "quantize"))  # quantize runs calibrate when calib/ is missing


@app.command()
def pack(config: ConfigOpt = None, workdir: WorkdirOpt = None, as_json: JsonOpt = False, sets: SetOpt = None,
         codec: Annotated[Optional[str], typer.Option(help="2bit (runtime layout) or base3 (1.6 bits a weight); overrides pack.codec.")] = None):
    """Pack the ternary codes into the 2-bit or base-3 format and report the storage ratio."""
    _run(_lazy("packing", "pack"), config, {"workdir": workdir, "pack.codec": codec}, as_json, sets=sets, writes=("pack",), needs="quantize")


@app.command()
def generate(prompt: Annotated[str, typer.Argument(help="The text prompt.")],
             out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Image to write: PNG, or the format its suffix names (.jpg, .webp); default <workdir>/images/<prompt>-<seed>.png.")] = None,
             seed: Annotated[Optional[int], typer.Option(help="Random seed; the same seed gives the same image.")] = None,
             steps: Annotated[Optional[int], typer.Option(help="Denoising steps.")] = None,
             height: Annotated[Optional[int], typer.Option(help="Image height in pixels.")] = None,
             width: Annotated[Optional[int], typer.Option(help="Image width in pixels.")] = None,
             guidance: Annotated[Optional[float], typer.Option(help="Guidance scale.")] = None,
             full_precision: Annotated[bool, typer.Option("--full-precision", help="Use the FP transformer instead of the packed 1.58-bit one.")] = False,
             activations: ActivationsOpt = None,
             config: ConfigOpt = None, workdir: WorkdirOpt = None, as_json: JsonOpt = False, sets: SetOpt = None):
    """Generate an image with the packed 1.58-bit transformer from the workdir."""
    overrides = {"workdir": workdir, "generate.seed": seed, "generate.steps": steps, "generate.height": height,
                 "generate.width": width, "generate.guidance": guidance, "quantization.activations": activations}
    _run(_lazy("generate", "generate"), config, overrides, as_json, prompt, out, full_precision, sets=sets, writes=("generate",))


@app.command()
def bench(config: ConfigOpt = None, workdir: WorkdirOpt = None, as_json: JsonOpt = False, sets: SetOpt = None,
          gpu: Annotated[Optional[str], typer.Option(help="GPU to report for (a10, l4, a100-80g, h100, ...); projected when it is not the present card.")] = None,
          random_weights: Annotated[bool, typer.Option("--random-weights", help="Measure the full-size architecture with random weights (no checkpoint needed).")] = False,
          kernels: Annotated[bool, typer.Option("--kernels", help="Time the ternary GEMM kernels on FLUX shapes instead of the model.")] = False,
          plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of storage, memory and latency bars.")] = None):
    """Storage, memory and latency of bf16 vs 1.58-bit, measured on CUDA or projected for a named GPU."""
    _run(_bench, config, {"workdir": workdir, "bench.gpu": gpu}, as_json, random_weights, kernels, plot, sets=sets)


@app.command("eval")
def evaluate(suite: Annotated[Optional[str], typer.Option(help="mini (the miniature world's GenEval-style scorer; default), or geneval / t2i-compbench (images in the layout their official evaluators read, resumable, data-parallel under torchrun); overrides eval.suite.")] = None,
             full_precision: Annotated[bool, typer.Option("--full-precision", help="Score the FP model instead of the packed 1.58-bit one.")] = False,
             images: Annotated[Optional[int], typer.Option("--images", help="Images per prompt; overrides eval.images_per_prompt.")] = None,
             split: Annotated[Optional[str], typer.Option("--split", help="test (held-out prompts, the score) or train (training prompts); overrides eval.split.")] = None,
             limit: Annotated[Optional[int], typer.Option("--limit", help="geneval / t2i-compbench: only the first N prompts (of each category); overrides eval.limit.")] = None,
             activations: ActivationsOpt = None,
             config: ConfigOpt = None, workdir: WorkdirOpt = None, as_json: JsonOpt = False, sets: SetOpt = None):
    """Score generated images per GenEval category and write a contact sheet (mini); or generate GenEval /
    T2I-CompBench images for their official evaluators."""
    overrides = {"workdir": workdir, "eval.suite": suite, "eval.images_per_prompt": images, "eval.split": split, "eval.limit": limit,
                 "quantization.activations": activations}
    _run(_lazy("evaluate", "evaluate"), config, overrides, as_json, full_precision, sets=sets, writes=("eval",))


@app.command()
def export(out: Annotated[Path, typer.Argument(help="File (gguf, bfl) or directory (diffusers) to write.")],
           fmt: Annotated[str, typer.Option("--format", "-f", help="gguf (ternary as ggml TQ2_0/TQ1_0, stable-diffusion.cpp / ComfyUI-GGUF), bfl (one safetensors file in the original BFL naming: ComfyUI, stable-diffusion.cpp, diffusers from_single_file) or diffusers (a transformer directory as save_pretrained writes it: config.json, the checkpoint, a model card; FluxTransformer2DModel.from_pretrained loads it once bitflux_cli is imported).")],
           codec: Annotated[Optional[str], typer.Option(help="gguf only: tq2_0 (2.06 bits a weight, default), tq1_0 (1.69) or q2_k (2.63, exact too; read in torch by ComfyUI-GGUF, which dequantizes the TQ types in numpy).")] = None,
           ternary: Annotated[bool, typer.Option("--ternary", help="bfl only: keep ternary codes and scales instead of dequantized bf16 weights.")] = False,
           config: ConfigOpt = None, workdir: WorkdirOpt = None, as_json: JsonOpt = False, sets: SetOpt = None):
    """Export the workdir's packed 1.58-bit transformer for other tools (GGUF, BFL single file, diffusers directory)."""
    _run(_lazy("export", "export"), config, {"workdir": workdir}, as_json, fmt, out, codec, ternary, sets=sets)


def _lazy(module: str, name: str):
    """The stage ``bitflux_cli.<module>.<name>``, imported when it runs: after the config and the workdir
    are checked, so a bad flag is answered at once, not after torch and diffusers load."""
    def stage(*args):
        return getattr(importlib.import_module(f"bitflux_cli.{module}"), name)(*args)
    return stage


def _quantize(cfg) -> dict:
    from .fidelity import fidelity_table
    from .quantize import quantize
    result = quantize(cfg)
    if "fidelity" in result:  # under torchrun only rank 0 measures it
        console.print(fidelity_table(result["fidelity"]))
    return result


def _bench(cfg, random_weights: bool, kernels: bool, plot: Path | None) -> dict:
    if kernels:
        from bitflux_kernels.bench import bench_kernels
        return bench_kernels()
    from .bench import render_table, run_bench
    report = run_bench(cfg, cfg.bench.gpu, random_weights, plot)
    console.print(render_table(report))
    return report


# click's UsageError, the base of typer.BadParameter (recent typers bundle their own click)
USAGE_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def main() -> None:
    """Console-script entry point. click's usage errors (an unknown option, a flag value of the wrong
    type, a missing argument) are one line and exit 2 too, not the usage text and a boxed message."""
    from .console import fix_mmap_threshold, quiet_libraries
    quiet_libraries()
    fix_mmap_threshold()
    try:
        code = app(standalone_mode=False)
    except USAGE_ERRORS as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "bitflux"
        if exc.format_message():  # empty when click already printed the help (no command given)
            console.print(f"[red]error:[/red] {exc.format_message()} (see `{command} --help`)", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C while click itself runs
        console.print("[red]interrupted[/red]")
        sys.exit(130)
    sys.exit(code or 0)
