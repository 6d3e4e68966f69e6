"""Load bitflux's GGUF exports (TQ2_0, TQ1_0, Q2_K) with ComfyUI-GGUF's own code and compare them with the BFL export.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/comfyui_gguf_check.py --comfyui /tmp/comfyui-min \
        --comfyui-gguf /tmp/comfyui-gguf/ComfyUI-GGUF --gguf flux-tq2_0.gguf flux-tq1_0.gguf flux-q2_k.gguf \
        --bfl flux-bfl.safetensors --workdir WORKDIR [--scratch DIR] [--prepared-by JSON] [--out JSON]

``--comfyui-gguf`` is a folder holding city96/ComfyUI-GGUF's files as its repository has them (``GGUF_FILES``,
unmodified); it is imported the way ComfyUI imports a custom node (a package named after the folder, its
``__init__.py`` run), next to ComfyUI's ``comfy`` package from ``--comfyui`` (imported by ``comfyui_check.py``'s
``import_comfy``, with its shims and ``--cpu``). ``--gguf`` are ``bitflux export --format gguf`` files, ``--bfl`` the
``--format bfl`` export of the same packed checkpoint in ``--workdir``. For each GGUF file:

- ComfyUI-GGUF's ``loader.gguf_sd_loader(path, return_arch=True)`` (what its "Unet Loader (GGUF)" node calls): the
  architecture it reports, the tensor types it logs, every log record and warning it emits; and its
  ``tools/convert.py`` ``detect_arch`` on the tensor names (the loader's path for files without
  ``general.architecture``);
- every tensor through ComfyUI-GGUF's ``dequant.dequantize_tensor`` (fp32 and bf16) against the BFL file's tensor
  of the same name: shape, exact equality, for the ternary tensors whether the codes (signs) are the same, the
  largest elementwise relative difference and the relative L2 difference; the time each dequantization takes.
  The GGUF holds codes x fp16(scale) (one fp16 scale per 256-block), the BFL file bf16(codes x scale), so the
  ternary tensors differ by that rounding in fp32;
- ComfyUI's ``detect_unet_config`` on the loaded state dict, then ComfyUI's ``Flux`` built with ComfyUI-GGUF's
  ``GGMLOps()`` as ``operations`` (as the node passes ``custom_operations``: the weights stay quantized
  ``GGMLTensor``s and each Linear dequantizes its weight in every forward), ``load_state_dict`` (strict=False as
  ComfyUI's ``load_model_weights``, then strict=True), ``forward_orig`` on ``comfyui_check.py``'s inputs in bf16 and
  fp32: relative L2 error against bitflux's packed model and against ComfyUI's ``Flux`` on the BFL file (built as
  ``comfyui_check.py`` builds it); forward time, and how many "Falling back to numpy dequant" lines a forward prints.

Controls (must fail): a copy of the TQ2_0 file with each 66-byte block of ``double_blocks.0.img_attn.qkv.weight``
having its two 32-byte halves of ``qs`` swapped (a bit-plane layout error), and a copy of the TQ1_0 file with the
256-blocks of every row of ``single_blocks.0.linear1.weight`` in reverse order (the scales, equal along a row,
cannot show it; a Q2_K file's ``qs`` are the TQ2_0 file's bytes, so it gets no control of its own): the codes must differ from the BFL file's and the forward error must exceed max(3e-2, 10 x the
match's). The copies are written to ``--scratch`` and deleted afterwards.

Shims (recorded in the JSON): ComfyUI-GGUF's ``nodes.py`` (the UI node classes; imports ComfyUI's ``nodes``,
``comfy.sd``, ``comfy.model_patcher``, ``folder_paths``) is not run: ``__init__.py``'s ``from .nodes import
NODE_CLASS_MAPPINGS`` gets an empty mapping; ``comfy.lora`` (imported by ``ops.py`` for ``calculate_weight``, which
runs only when LoRA patches are attached; ComfyUI's ``comfy/lora.py`` imports ``comfy.model_base``, i.e. every model
family) is an empty module whose ``calculate_weight`` raises. ``comfy.utils`` is ``comfyui_check.py``'s empty
stand-in (ComfyUI-GGUF's ``__init__.py`` imports it only to test that it runs inside ComfyUI).
"""

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import shutil
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfyui_check import embedded_in_bf16, file_record, import_comfy, inputs, rel

REPO = "city96/ComfyUI-GGUF"
COMMIT = "795e45156ece99afbc3efef911e63fcb46e6a20d"  # HEAD of the stored snapshot, 2025-12-18 "Use int64 for index in dequant"
# every file as it is at COMMIT, with the commit that last changed it (where the file index stores that version)
GGUF_FILES = {
    "__init__.py": "a8ce4e8d7c3b8d99c12fbc2892fde1b42696238d",
    "dequant.py": "795e45156ece99afbc3efef911e63fcb46e6a20d",
    "loader.py": "8493db648158a71eb9582b6bffca73365c113907",
    "ops.py": "be2a08330d7ec232d684e50ab938870d7529471e",
    "nodes.py": "02dac863ee1b65852d39ce6b9180bf5d9bc8a636",
    "tools/convert.py": "b1350f6f5a32b8554b7b58435a281c908b0de497",
}
PKG = "ComfyUI-GGUF"  # the module name ComfyUI gives a custom node: its folder's name
GGUF_SHIMS = {
    f"{PKG}.nodes": "ComfyUI-GGUF's UI node classes (UnetLoaderGGUF ...; imports ComfyUI's nodes, comfy.sd, "
                    "comfy.model_patcher, folder_paths): not run; __init__.py's `from .nodes import "
                    "NODE_CLASS_MAPPINGS` gets {}. The node's load_unet is gguf_sd_loader + GGMLOps() as "
                    "custom_operations, which this check calls directly",
    "comfy.lora": "imported by ops.py for calculate_weight, called only when LoRA patches are attached (none "
                  "here); ComfyUI's comfy/lora.py imports comfy.model_base (every model family). The shim's "
                  "calculate_weight raises if called",
}
H = 3072


def ternary_type(type_name: str) -> bool:
    """Whether a ggml type name is one of the ternary tensors' (TQ2_0, TQ1_0, Q2_K), not a dense one."""
    return type_name not in ("F32", "F16", "BF16")


def import_comfyui_gguf(root: Path):
    """ComfyUI-GGUF from ``root`` as ComfyUI loads a custom node, with GGUF_SHIMS; ComfyUI must be imported first."""
    import comfy

    def calculate_weight(*_, **__):
        raise NotImplementedError("shim: comfy.lora is not loaded by benchmarks/comfyui_gguf_check.py")

    lora = types.ModuleType("comfy.lora")
    lora.calculate_weight = calculate_weight
    sys.modules["comfy.lora"] = comfy.lora = lora
    nodes = types.ModuleType(f"{PKG}.nodes")
    nodes.NODE_CLASS_MAPPINGS = {}
    sys.modules[f"{PKG}.nodes"] = nodes
    spec = importlib.util.spec_from_file_location(PKG, root / "__init__.py", submodule_search_locations=[str(root)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PKG] = pkg
    spec.loader.exec_module(pkg)
    mods = [importlib.import_module(f"{PKG}.{m}") for m in ("loader", "dequant", "ops", "tools.convert")]
    for mod in mods:
        assert Path(mod.__file__).resolve().is_relative_to(root.resolve()), mod.__file__
    return mods


class Captured(logging.Handler):
    """Log records (ComfyUI-GGUF logs through the root logger) and stdout (its tqdm.write) while active."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records, self.stdout = [], io.StringIO()

    def emit(self, record):
        self.records.append(f"{record.levelname}: {record.getMessage()}")

    @contextlib.contextmanager
    def active(self):
        root = logging.getLogger()
        level = root.level
        root.addHandler(self)
        root.setLevel(logging.DEBUG)
        try:
            with contextlib.redirect_stdout(self.stdout):
                yield self
        finally:
            root.removeHandler(self)
            root.setLevel(level)

    def lines(self):
        return self.records + [s for s in self.stdout.getvalue().splitlines() if s]


def compare_tensor(dequant, t, ref):
    """ComfyUI-GGUF's dequantize_tensor of GGMLTensor ``t`` (fp32 and bf16) against the BFL tensor ``ref`` (bf16)."""
    import torch

    start = time.perf_counter()
    g32 = dequant.dequantize_tensor(t, dtype=torch.float32)
    seconds = time.perf_counter() - start
    g16 = dequant.dequantize_tensor(t, dtype=torch.bfloat16)
    r = ref.float()
    out = {"type": getattr(t.tensor_type, "name", repr(t.tensor_type)), "shape": list(t.shape),
           "dequantized_shape": list(g32.shape), "same_shape": list(g32.shape) == list(ref.shape),
           "dequantize_s": round(seconds, 4)}
    if not out["same_shape"]:
        return out, seconds
    g32 = g32.reshape(ref.shape)
    nz = r != 0
    diff = (g32 - r).abs()
    out |= {"exact_fp32": bool(torch.equal(g32, r)), "exact_bf16": bool(torch.equal(g16.reshape(ref.shape), ref)),
            "bf16_elements_equal": round((g16.reshape(ref.shape) == ref).float().mean().item(), 8),
            "max_rel_diff": (diff[nz] / r[nz].abs()).max().item() if nz.any() else 0.0,
            "rel_l2": rel(r, g32) if r.norm() > 0 else diff.max().item(),
            "zero_where_ref_zero": bool((g32[~nz] == 0).all())}
    if ternary_type(out["type"]):
        out["codes_equal"] = bool(torch.equal(torch.sign(g32), torch.sign(r)))
    return out, seconds


def load_gguf(loader, path: Path):
    cap = Captured()
    start = time.perf_counter()
    with cap.active():
        sd, arch = loader.gguf_sd_loader(str(path), return_arch=True)
    seconds = time.perf_counter() - start
    types_seen = {}
    for v in sd.values():
        name = getattr(getattr(v, "tensor_type", None), "name", repr(getattr(v, "tensor_type", None)))
        types_seen[name] = types_seen.get(name, 0) + 1
    return sd, {"arch": arch, "tensors": len(sd), "tensor_types_in_state_dict": types_seen,
                "log": cap.lines(), "warnings": [line for line in cap.lines() if line.startswith(("WARNING", "ERROR"))],
                "seconds": round(seconds, 2)}


def patch_tensor(src: Path, dst: Path, name: str, how: str) -> dict:
    """Copy ``src`` to ``dst`` with the bytes of tensor ``name`` rearranged (``how``: "swap-halves" for TQ2_0's qs
    halves in every block, "reverse-blocks" for the order of the 256-blocks in every row)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    t = next(t for t in reader.tensors if t.name == name)
    _, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    data = np.array(t.data, dtype=np.uint8)  # [rows, bytes a row]
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, size)
    if how == "swap-halves":
        assert t.tensor_type == gguf.GGMLQuantizationType.TQ2_0
        blocks = np.concatenate([blocks[..., 32:64], blocks[..., 0:32], blocks[..., 64:]], axis=-1)
    elif how == "reverse-blocks":
        blocks = blocks[:, ::-1]
    new = np.ascontiguousarray(blocks).reshape(-1)
    offset = t.data_offset  # the reader's tensor offsets are from the start of the file
    assert len(new) == t.n_bytes
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(new.tobytes())
    # the copy differs from the original in that tensor's bytes only
    changed = gguf.GGUFReader(str(dst))
    for a, b in zip(reader.tensors, changed.tensors, strict=True):
        same = np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8))
        assert same == (a.name != name), a.name
    assert np.array_equal(np.asarray(next(b for b in changed.tensors if b.name == name).data).reshape(-1), new)
    del reader, changed
    return {"tensor": name, "type": t.tensor_type.name, "change": how, "bytes_changed": int((new != data.reshape(-1)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="folder holding ComfyUI's comfy package")
    parser.add_argument("--comfyui-gguf", type=Path, required=True, help="folder holding ComfyUI-GGUF's files")
    parser.add_argument("--gguf", type=Path, nargs="+", required=True, help="bitflux export --format gguf files")
    parser.add_argument("--bfl", type=Path, required=True, help="bitflux export --format bfl of the same checkpoint")
    parser.add_argument("--workdir", type=Path, required=True, help="the bitflux workdir the files were exported from")
    parser.add_argument("--scratch", type=Path, help="folder for the control files (default: beside the first GGUF)")
    parser.add_argument("--prepared-by", type=json.loads, default=[], help="JSON list of the commands that made the inputs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import gguf
    import torch
    from safetensors.torch import load_file

    from bitflux_cli.artifacts import artifact_path, file_sha256
    from bitflux_cli.loader import load_quantized_transformer

    torch.manual_seed(0)
    files = {path: {"last_changed_in": commit} | file_record(args.comfyui_gguf / path) for path, commit in GGUF_FILES.items()}
    report = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "commands": args.prepared_by,
        "comfyui_gguf": {
            "repo": REPO, "commit": COMMIT, "files": files, "shimmed_imports": GGUF_SHIMS,
            "source": "every file as it is at the one commit COMMIT (the newest in the stored snapshot of the "
                      "repository, brought here with the fetch tool and read with git show), written unmodified; "
                      "the file index's read_file, at the commits that last changed them, gave dequant.py (795e4515) "
                      "and loader.py (8493db64) with the same length (12,338 and 17,135 characters) and the same "
                      "text where read; it stores ops.py, __init__.py and tools/convert.py only under other commits",
            "import": f"as ComfyUI imports a custom node: package {PKG!r} from the folder, its __init__.py run",
            "comfyui": "ComfyUI's files, shims and argv are those of benchmarks/comfyui_check.py "
                       "(benchmarks/results/comfyui-check.json); comfy.utils is its empty stand-in"},
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "gguf", "numpy", "tqdm", "packaging",
                                                                 "einops", "safetensors", "diffusers")},
    }

    flux_model, model_detection, ops = import_comfy(args.comfyui)
    import comfy.model_management as mm
    cap = Captured()
    with cap.active():
        loader, dequant, gguf_ops, convert = import_comfyui_gguf(args.comfyui_gguf)
    report["comfyui_gguf"]["import_log"] = cap.lines()
    report["comfyui_gguf"]["dequantize_functions"] = sorted(t.name for t in dequant.dequantize_functions)
    report["comfyui_gguf"]["tq_types_have_torch_dequantizer"] = any(
        t in dequant.dequantize_functions for t in (gguf.GGMLQuantizationType.TQ1_0, gguf.GGMLQuantizationType.TQ2_0))

    bfl = load_file(str(args.bfl))
    report["bfl"] = {"file": args.bfl.name, "bytes": args.bfl.stat().st_size, "tensors": len(bfl)}
    img, txt, y, img_ids, txt_ids, timestep, guidance = inputs()
    as_embedded = embedded_in_bf16(timestep, guidance)

    def comfy_out(m, dtype):  # comfyui_check.py's comfy_out: bf16 gets the values diffusers embeds, fp32 the raw ones
        t, g = (as_embedded["t"], as_embedded["g"]) if dtype == torch.bfloat16 else (timestep, guidance)
        with torch.no_grad():
            return m.forward_orig(img.to(dtype), img_ids[None], txt.to(dtype), txt_ids[None], t, y.to(dtype), g)

    # references: bitflux's packed model (bf16 and fp32) and ComfyUI's Flux on the BFL file (as comfyui_check.py)
    packed = load_quantized_transformer(artifact_path(args.workdir, "pack"))
    with torch.no_grad():
        ref = {torch.bfloat16: packed(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y,
                                      timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                                      return_dict=False)[0]}
        packed.float()
        ref[torch.float32] = packed(hidden_states=img.float(), encoder_hidden_states=txt.float(),
                                    pooled_projections=y.float(), timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                                    guidance=guidance, return_dict=False)[0]
    del packed
    bfl_config = model_detection.detect_unet_config(bfl, "")
    bfl_out, bfl_seconds = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        m = flux_model.Flux(**bfl_config, dtype=dtype, operations=ops.disable_weight_init)
        m.load_state_dict({k: v.to(dtype) for k, v in bfl.items()}, strict=True)
        start = time.perf_counter()
        bfl_out[dtype] = comfy_out(m.eval(), dtype)
        bfl_seconds[str(dtype)] = round(time.perf_counter() - start, 2)
        del m
    report["references"] = {
        "packed_output_std": round(ref[torch.bfloat16].float().std().item(), 4),
        "comfyui_flux_on_bfl_vs_packed": {"bfloat16": rel(ref[torch.bfloat16], bfl_out[torch.bfloat16]),
                                          "float32": rel(ref[torch.float32], bfl_out[torch.float32])},
        "comfyui_flux_on_bfl_forward_s": bfl_seconds,
        "inputs": {"img_tokens": list(img.shape), "txt": list(txt.shape), "y": list(y.shape), "timestep": 0.7,
                   "guidance": 3.5, "comfyui_timestep_guidance_bf16": [as_embedded["t"].item(), as_embedded["g"].item()],
                   "note": "as comfyui_check.py: in bf16 ComfyUI is given the timestep and guidance diffusers "
                           "embeds (3.5 * 1000 in bf16 is 3504), in fp32 the values as they are"},
        "comfyui_unet_dtype_on_this_cpu": str(mm.unet_dtype(device=torch.device("cpu"), model_params=1,
                                                            supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])),
    }
    print(f"ComfyUI Flux on the BFL file vs packed: {report['references']['comfyui_flux_on_bfl_vs_packed']}", file=sys.stderr)

    expected = {"image_model": "flux", "hidden_size": H, "num_heads": 24, "in_channels": 16, "out_channels": 16,
                "context_in_dim": 4096, "vec_in_dim": 768, "guidance_embed": True,
                "depth": bfl_config["depth"], "depth_single_blocks": bfl_config["depth_single_blocks"]}

    def run_gguf(sd, dtypes, cap_forward=True):
        """ComfyUI's Flux with ComfyUI-GGUF's GGMLOps on GGUF state dict ``sd``: load, forward in ``dtypes``."""
        config = model_detection.detect_unet_config(sd, "")
        res = {"detected_config": config,
               "detected_as_flux_with_file_config": config is not None and all(config.get(k) == v for k, v in expected.items())}
        gops = gguf_ops.GGMLOps()  # as the node's load_unet: dequant_dtype and patch_dtype "default" -> None
        gops.Linear.dequant_dtype = None
        gops.Linear.patch_dtype = None
        res["operations"] = "GGMLOps (ComfyUI-GGUF ops.py), dequant_dtype None, patch_dtype None"
        for dtype in dtypes:
            key = str(dtype).removeprefix("torch.")
            r = res.setdefault("forward", {}).setdefault(key, {})
            m = flux_model.Flux(**config, dtype=dtype, operations=gops)
            loaded = m.load_state_dict(sd, strict=False)
            r["missing_keys"], r["unexpected_keys"] = sorted(loaded.missing_keys), sorted(loaded.unexpected_keys)
            try:
                m.load_state_dict(sd, strict=True)
                r["strict_ok"], r["strict_error"] = True, None
            except RuntimeError as e:
                r["strict_ok"], r["strict_error"] = False, str(e)[:2000]
            quantized = [n for n, p in m.named_parameters() if dequant.is_quantized(p)]
            r["quantized_parameters_in_model"] = len(quantized)
            r["parameter_classes"] = sorted({type(p).__name__ for p in m.parameters()})
            cap = Captured()
            start = time.perf_counter()
            try:
                with cap.active():
                    out = comfy_out(m.eval(), dtype)
            except Exception as e:  # noqa: BLE001  (recorded; the fallback below then runs)
                r["error"] = f"{type(e).__name__}: {e}"[:2000]
                out = None
            r["forward_s"] = round(time.perf_counter() - start, 2)
            lines = cap.lines()
            fallbacks = [s for s in lines if s.startswith("Falling back to numpy dequant")]
            r["numpy_fallback_lines"] = len(fallbacks)
            r["numpy_fallback_examples"] = sorted(set(fallbacks))
            r["other_log"] = [s for s in lines if not s.startswith("Falling back to numpy dequant")][:20]
            del m
            if out is None:
                # fallback: ComfyUI-GGUF's dequantize_tensor up front, ComfyUI's disable_weight_init
                dense = {k: dequant.dequantize_tensor(v, dtype=dtype) for k, v in sd.items()}
                m = flux_model.Flux(**config, dtype=dtype, operations=ops.disable_weight_init)
                m.load_state_dict(dense, strict=True)
                out = comfy_out(m.eval(), dtype)
                r["fallback"] = "GGMLOps forward failed; dequantized weights in comfy.ops.disable_weight_init"
                del m, dense
            r |= {"finite": bool(torch.isfinite(out).all()), "shape": list(out.shape),
                  "rel_l2_error_vs_packed": rel(ref[dtype], out),
                  "rel_l2_error_vs_comfyui_flux_on_bfl": rel(bfl_out[dtype], out)}
        return res

    report["files"] = {}
    scratch = args.scratch or args.gguf[0].parent
    for path in args.gguf:
        entry = report["files"][path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        sd, entry["load"] = load_gguf(loader, path)
        entry["detect_arch_from_tensor_names"] = convert.detect_arch(set(sd)).arch
        print(f"{path.name}: gguf_sd_loader arch {entry['load']['arch']!r}, types {entry['load']['tensor_types_in_state_dict']}",
              file=sys.stderr)
        tensors, tq_s, tq_weights, other_s = {}, 0.0, 0, 0.0
        cap = Captured()
        with cap.active():
            for name, t in sd.items():
                if name not in bfl:
                    tensors[name] = {"in_bfl": False}
                    continue
                tensors[name], seconds = compare_tensor(dequant, t, bfl[name])
                if ternary_type(tensors[name]["type"]):
                    tq_s += seconds
                    tq_weights += bfl[name].numel()
                else:
                    other_s += seconds
        fallbacks = [s for s in cap.lines() if s.startswith("Falling back")]
        missing = sorted(set(bfl) - set(sd))
        tq = {k: v for k, v in tensors.items() if ternary_type(v.get("type", "F32"))}
        dense = {k: v for k, v in tensors.items() if v.get("type") and not ternary_type(v["type"])}
        inexact = {k: v for k, v in tensors.items() if not v.get("exact_fp32")}
        entry["tensors_vs_bfl"] = {
            "compared": len(tensors), "not_in_bfl": [k for k, v in tensors.items() if not v.get("in_bfl", True)],
            "bfl_tensors_not_in_gguf": missing,
            "all_same_shape": all(v.get("same_shape") for v in tensors.values()),
            "exact_fp32": sum(bool(v.get("exact_fp32")) for v in tensors.values()),
            "exact_bf16": sum(bool(v.get("exact_bf16")) for v in tensors.values()),
            "dense_exact_fp32": f"{sum(bool(v.get('exact_fp32')) for v in dense.values())}/{len(dense)}",
            "ternary": len(tq),
            "ternary_codes_equal": f"{sum(bool(v.get('codes_equal')) for v in tq.values())}/{len(tq)}",
            "ternary_exact_bf16": f"{sum(bool(v.get('exact_bf16')) for v in tq.values())}/{len(tq)}",
            "ternary_min_bf16_elements_equal": min((v["bf16_elements_equal"] for v in tq.values()), default=None),
            "inexact_fp32_max_rel_diff": max((v.get("max_rel_diff", float("inf")) for v in inexact.values()), default=0.0),
            "inexact_fp32_max_rel_l2": max((v.get("rel_l2", float("inf")) for v in inexact.values()), default=0.0),
            "numpy_fallback_lines": len(fallbacks), "numpy_fallback_examples": sorted(set(fallbacks)),
            "per_tensor": tensors,
        }
        # weights dequantized by a full FLUX.1-dev forward: the stand-in's per-block TQ weights x 19 and x 38
        per_double = sum(bfl[k].numel() for k in tq if k.startswith("double_blocks."))
        per_single = sum(bfl[k].numel() for k in tq if k.startswith("single_blocks."))
        full = 19 * per_double + 38 * per_single
        entry["dequantize_time"] = {
            "ternary_s": round(tq_s, 2), "ternary_weights": tq_weights,
            "ns_per_ternary_weight": round(tq_s / tq_weights * 1e9, 2), "dense_bf16_f32_s": round(other_s, 3),
            "flux_dev_ternary_weights": full, "flux_dev_ternary_s_per_forward_extrapolated": round(tq_s / tq_weights * full, 1),
            "note": "ComfyUI-GGUF's dequantize_tensor to fp32, one CPU thread (OMP_NUM_THREADS=1); the TQ types "
                    "go through the gguf package's numpy dequantizer, Q2_K through ComfyUI-GGUF's torch one. Each Linear dequantizes its weight in "
                    "every forward, so this is the dequantize time of one forward; the FLUX.1-dev figure scales "
                    "it linearly to 19 + 38 blocks",
        }
        print(f"{path.name}: {entry['tensors_vs_bfl']['exact_fp32']}/{len(tensors)} tensors exact in fp32, "
              f"{entry['tensors_vs_bfl']['exact_bf16']} in bf16, codes {entry['tensors_vs_bfl']['ternary_codes_equal']}, "
              f"max rel diff {entry['tensors_vs_bfl']['inexact_fp32_max_rel_diff']:.3e}; ternary dequantize {tq_s:.1f} s",
              file=sys.stderr)
        entry["model"] = run_gguf(sd, (torch.bfloat16, torch.float32))
        for k, v in entry["model"]["forward"].items():
            print(f"{path.name}: GGMLOps Flux {k}: vs packed {v['rel_l2_error_vs_packed']:.3e}, vs ComfyUI on BFL "
                  f"{v['rel_l2_error_vs_comfyui_flux_on_bfl']:.3e}, forward {v['forward_s']} s, "
                  f"{v['numpy_fallback_lines']} numpy fallbacks", file=sys.stderr)
        del sd

    # controls
    report["controls"] = {}
    plans = {"tq2_0": ("double_blocks.0.img_attn.qkv.weight", "swap-halves"),
             "tq1_0": ("single_blocks.0.linear1.weight", "reverse-blocks")}
    for path in args.gguf:
        reader = gguf.GGUFReader(str(path))
        qtype = next(t.tensor_type for t in reader.tensors if t.tensor_type.name not in ("F32", "F16", "BF16"))
        del reader
        if qtype.name.lower() not in plans:  # q2_k: its qs are TQ2_0's bytes, which the tq2_0 control covers
            continue
        name, how = plans[qtype.name.lower()]
        dst = scratch / f"control-{how}-{path.name}"
        ctrl = patch_tensor(path, dst, name, how)
        try:
            sd, _ = loader.gguf_sd_loader(str(dst), return_arch=True)
            with Captured().active():
                cmp, _ = compare_tensor(dequant, sd[name], bfl[name])
            ctrl["tensor_vs_bfl"] = {k: cmp[k] for k in ("codes_equal", "exact_bf16", "max_rel_diff", "rel_l2")}
            res = run_gguf(sd, (torch.bfloat16,))
            f = res["forward"]["bfloat16"]
            ctrl["forward_bf16"] = {k: f[k] for k in ("strict_ok", "rel_l2_error_vs_packed",
                                                       "rel_l2_error_vs_comfyui_flux_on_bfl", "numpy_fallback_lines")}
            del sd
        finally:
            dst.unlink()
        report["controls"][f"{path.name}: {name} {how}"] = ctrl
        print(f"control {path.name} {name} {how}: codes equal {ctrl['tensor_vs_bfl']['codes_equal']}, "
              f"vs packed {ctrl['forward_bf16']['rel_l2_error_vs_packed']:.3e}", file=sys.stderr)

    match = max(v["model"]["forward"]["bfloat16"]["rel_l2_error_vs_packed"] for v in report["files"].values())
    report["outcome"] = {
        "loader_arch_flux": all(v["load"]["arch"] == "flux" for v in report["files"].values()),
        "loader_warnings": sum(len(v["load"]["warnings"]) for v in report["files"].values()),
        "all_tensors_same_names_and_shapes": all(v["tensors_vs_bfl"]["all_same_shape"] and
                                                 not v["tensors_vs_bfl"]["bfl_tensors_not_in_gguf"] and
                                                 not v["tensors_vs_bfl"]["not_in_bfl"] for v in report["files"].values()),
        "ternary_codes_equal": all(v["tensors_vs_bfl"]["ternary_codes_equal"].split("/")[0] ==
                                   v["tensors_vs_bfl"]["ternary_codes_equal"].split("/")[1] for v in report["files"].values()),
        "detected_as_flux_with_file_config": all(v["model"]["detected_as_flux_with_file_config"] for v in report["files"].values()),
        "strict_load": all(f["strict_ok"] for v in report["files"].values() for f in v["model"]["forward"].values()),
        "ran_with_ggmlops": all("fallback" not in f for v in report["files"].values() for f in v["model"]["forward"].values()),
        "matches_packed_model": match < 3e-2,
        "controls_fail": all(not c["tensor_vs_bfl"]["codes_equal"] and
                             c["forward_bf16"]["rel_l2_error_vs_packed"] > max(3e-2, 10 * match)
                             for c in report["controls"].values()),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
