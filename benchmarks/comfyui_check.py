"""Load a bitflux BFL export with ComfyUI's own Flux code and compare its output with bitflux's packed model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/comfyui_check.py --comfyui /tmp/comfyui-min --bfl flux-bfl.safetensors \
        --workdir WORKDIR [--prepared-by JSON] [--out JSON]

``--comfyui`` is a folder holding ComfyUI's ``comfy`` package (only the files listed in ``FILES`` are needed:
the Flux module, model detection and what they import); ComfyUI is imported from there and from nowhere else.
``--bfl`` is ``bitflux export --format bfl`` of the packed checkpoint in ``--workdir``. Steps:

- ComfyUI's ``comfy.model_detection.detect_unet_config(state_dict, "")`` on the file's tensors: the detected config
  (``image_model`` flux, ``depth``/``depth_single_blocks`` as in the file, ``hidden_size`` 3072, ``guidance_embed``);
- ComfyUI's ``comfy.ldm.flux.model.Flux(**config, dtype=bfloat16, operations=comfy.ops.disable_weight_init)``
  and ``load_state_dict(strict=True)``: missing and unexpected keys;
- its ``forward_orig`` on fixed inputs (packed 2x2 latent tokens, T5-width context, pooled CLIP vector, timestep
  0.7, guidance 3.5; both ComfyUI and diffusers multiply timestep and guidance by 1000, diffusers in bf16, which
  turns 3500 into 3504, so ComfyUI is given 3.504) against bitflux's packed model (diffusers'
  ``FluxTransformer2DModel`` with ``TernaryLinear``s, bf16) on the same inputs: relative L2 error; also with
  ComfyUI given 3.5 as is, and with both models in fp32;
- controls: the same with the q and k thirds of ``double_blocks.0.img_attn.qkv`` swapped, and with the q part and
  the first hidden-width slice of the MLP part of ``single_blocks.0.linear1`` swapped (weight and bias): a wrong
  fusion order must give an error far above the match's (more than 10x it and above 3e-2).

``comfy.model_detection`` imports ``comfy.supported_models``, ``comfy.supported_models_base`` and ``comfy.utils``
(every model family ComfyUI supports, text encoders, tokenizers), and ``comfy.ldm.modules.diffusionmodules.util``
imports ``comfy.ldm.util``; ``detect_unet_config`` and the Flux forward use none of them, so they are replaced by
empty modules (``SHIMS``, recorded in the JSON). ComfyUI's ``comfy/options.py`` in the version used turns argument
parsing on, so while ComfyUI is imported ``sys.argv`` is ComfyUI's own command line for a machine without a GPU:
``--cpu`` (as ``python main.py --cpu``; without it model_management asks CUDA for a device and fails).
The JSON holds the files read (path, ComfyUI commit, sha256), package versions, the command and the outcomes.
"""

import argparse
import hashlib
import importlib.metadata
import json
import sys
import time
import types
from pathlib import Path

# The ComfyUI files this check needs under --comfyui, as read from the stored copy of comfyanonymous/ComfyUI,
# with the commit each was read at. The index keeps a file version only under the commit that introduced it,
# so no single commit holds all of them: five are the versions stored at ANCHOR, the others the nearest stored
# versions found that are API-compatible with them (see README).
ANCHOR = "6edd534542f16f2fa39d54fdcde1a7179ba388ef"
FILES = {
    "comfy/ldm/flux/model.py": ANCHOR,
    "comfy/ldm/flux/layers.py": ANCHOR,
    "comfy/ops.py": ANCHOR,
    "comfy/model_management.py": ANCHOR,
    "comfy/ldm/modules/sub_quadratic_attention.py": ANCHOR,
    "comfy/ldm/flux/math.py": "a779e34c5bc1e3892041c6dbdc6b34e1a3ecee8d",
    "comfy/ldm/common_dit.py": "a0b35e60a3964ff66ed782499dfa6a17fab5b94a",
    "comfy/model_detection.py": "006dd0ae6cf66f66ea0d2ad7db73dea920de9936",
    "comfy/ldm/modules/attention.py": "2700d3bf9c622610e4b433cb4e50f27fed1d0781",
    "comfy/ldm/modules/diffusionmodules/util.py": "01312a55a43596dd0077a1d4c0c97856c5610167",
    "comfy/cli_args.py": "689db36073ce562f576c5b7aed082aceb5f152bf",
    "comfy/options.py": "058e5dc6342451b2c4947a05836887390fe989b4",
    "comfy/float.py": "16c36470e69bbbde7b7fc1ea3a0f893821d90336",
}
SHIMS = {
    "comfy.supported_models": "imported by model_detection for model_config_from_unet_config (not called); pulls in "
                              "every model family and text encoder ComfyUI supports",
    "comfy.supported_models_base": "imported by model_detection for model_config_from_unet (not called); imports "
                                   "comfy.model_base, which imports every model family",
    "comfy.utils": "imported by model_detection for the diffusers-key converters (not called)",
    "comfy.ldm.util": "imported by diffusionmodules/util.py for instantiate_from_config (not called); the shim's "
                      "instantiate_from_config raises if called",
}


COMFY_ARGV = ["--cpu"]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / a.float().norm()).item()


def import_comfy(root: Path):
    """ComfyUI's modules from ``root`` only, with the SHIMS as empty modules and COMFY_ARGV as its command line."""
    import torch  # noqa: F401  (imported first, as ComfyUI's main does)

    for name in SHIMS:
        sys.modules[name] = types.ModuleType(name)

    def instantiate_from_config(*_, **__):
        raise NotImplementedError("shim: comfy.ldm.util is not loaded by benchmarks/comfyui_check.py")

    sys.modules["comfy.ldm.util"].instantiate_from_config = instantiate_from_config
    sys.path.insert(0, str(root))
    argv, sys.argv = sys.argv, [sys.argv[0], *COMFY_ARGV]
    try:
        import comfy.ldm.flux.model as flux_model
        from comfy import model_detection, ops
    finally:
        sys.argv = argv
    for mod in (flux_model, model_detection, ops):
        assert Path(mod.__file__).resolve().is_relative_to(root.resolve()), mod.__file__
    return flux_model, model_detection, ops


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a source file read for a check."""
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def inputs():
    """The inputs of tests/test_export_formats.py's from_single_file test: img tokens [1, 16, 64] (4x4 packed 2x2
    latent tokens), T5 context [1, 8, 4096], pooled CLIP [1, 768] (bf16), img_ids, txt_ids, timestep, guidance."""
    import torch

    gen = torch.Generator().manual_seed(0)
    img = torch.randn(1, 16, 64, generator=gen).bfloat16()
    txt = torch.randn(1, 8, 4096, generator=gen).bfloat16()
    y = torch.randn(1, 768, generator=gen).bfloat16()
    img_ids = torch.stack([torch.zeros(16), torch.arange(16.) // 4, torch.arange(16.) % 4], -1)
    txt_ids = torch.zeros(8, 3)
    return img, txt, y, img_ids, txt_ids, torch.tensor([0.7]), torch.tensor([3.5])


def embedded_in_bf16(timestep, guidance) -> dict:
    """{"t", "g"}: the values diffusers' FluxTransformer2DModel embeds in bf16 (x 1000 in bf16: guidance 3500
    becomes 3504), for ComfyUI, which multiplies by 1000 in fp32."""
    import torch

    return {name: (v.to(torch.bfloat16) * 1000).float() / 1000 for name, v in (("t", timestep), ("g", guidance))}


def swapped(sd: dict, key: str, a: slice, b: slice) -> dict:
    """A copy of ``sd`` with rows ``a`` and ``b`` of ``key``.weight and ``key``.bias exchanged."""
    out = dict(sd)
    for leaf in ("weight", "bias"):
        t = sd[f"{key}.{leaf}"].clone()
        t[a], t[b] = sd[f"{key}.{leaf}"][b].clone(), sd[f"{key}.{leaf}"][a].clone()
        out[f"{key}.{leaf}"] = t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="folder holding ComfyUI's comfy package")
    parser.add_argument("--bfl", type=Path, required=True, help="bitflux export --format bfl OUT.safetensors")
    parser.add_argument("--workdir", type=Path, required=True, help="the bitflux workdir the file was exported from")
    parser.add_argument("--prepared-by", type=json.loads, default=[], help="JSON list of the commands that made the inputs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from bitflux_cli.artifacts import artifact_path
    from bitflux_cli.loader import load_quantized_transformer

    torch.manual_seed(0)
    files = {path: {"commit": commit} | file_record(args.comfyui / path) for path, commit in FILES.items()}
    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "commands": args.prepared_by,
              "comfyui": {"repo": "comfyanonymous/ComfyUI", "anchor_commit": ANCHOR, "files": files,
                          "shimmed_imports": SHIMS,
                          "note": "each file is the version stored under the commit given; no stored commit holds "
                                  "them all. diffusionmodules/util.py and options.py are in the style of "
                                  "hiddenswitch's pip-installable fork (package-relative imports; options.py "
                                  "leaves argument parsing on)",
                          "argv": COMFY_ARGV, "argv_note": "ComfyUI's command line while it is imported "
                          "(its options.py turns parsing on); --cpu as python main.py --cpu on a machine without a GPU"},
              "versions": {p: importlib.metadata.version(p) for p in ("torch", "einops", "psutil", "safetensors", "diffusers")},
              "bfl": {"file": args.bfl.name, "bytes": args.bfl.stat().st_size}}

    flux_model, model_detection, ops = import_comfy(args.comfyui)
    sd = load_file(str(args.bfl))
    with safe_open(args.bfl, "pt") as f:
        report["bfl"]["tensors"] = len(f.keys())
    depth = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    depth_single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})

    config = model_detection.detect_unet_config(sd, "")
    expected = {"image_model": "flux", "depth": depth, "depth_single_blocks": depth_single, "hidden_size": 3072,
                "num_heads": 24, "in_channels": 16, "out_channels": 16, "context_in_dim": 4096, "vec_in_dim": 768,
                "guidance_embed": True}
    report["detection"] = {"config": config, "expected": expected,
                           "ok": config is not None and all(config.get(k) == v for k, v in expected.items())}
    print(f"detect_unet_config: {config}", file=sys.stderr)

    def comfy_model(state):
        m = flux_model.Flux(**config, dtype=torch.bfloat16, operations=ops.disable_weight_init)
        res = m.load_state_dict(state, strict=False)
        return m.eval(), sorted(res.missing_keys), sorted(res.unexpected_keys)

    t = time.time()
    model, missing, unexpected = comfy_model(sd)
    strict_error = None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        strict_error = str(e)[:2000]
    report["load"] = {"strict_ok": strict_error is None, "missing_keys": missing, "unexpected_keys": unexpected,
                      "strict_error": strict_error, "params": sum(p.numel() for p in model.parameters()),
                      "state_dict_keys": len(model.state_dict()), "file_keys": len(sd), "seconds": round(time.time() - t, 1)}

    img, txt, y, img_ids, txt_ids, timestep, guidance = inputs()

    packed = load_quantized_transformer(artifact_path(args.workdir, "pack"))  # bf16, TernaryLinear blocks
    # diffusers' FluxTransformer2DModel multiplies timestep and guidance by 1000 in the model dtype (bf16), which
    # rounds guidance 3500 to 3504; ComfyUI multiplies by 1000 in fp32. ComfyUI is given the values diffusers embeds.
    as_embedded = embedded_in_bf16(timestep, guidance)
    with torch.no_grad():
        ref = packed(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=timestep,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]

        def comfy_out(m, t=as_embedded["t"], g=as_embedded["g"], dtype=torch.bfloat16):
            return m.forward_orig(img.to(dtype), img_ids[None], txt.to(dtype), txt_ids[None], t, y.to(dtype), g)

        out = comfy_out(model)
        out_raw = comfy_out(model, timestep, guidance)
        # both in fp32 (no bf16 rounding anywhere): ComfyUI's Flux in fp32 against the packed model in fp32
        ref32 = packed.float()(hidden_states=img.float(), encoder_hidden_states=txt.float(), pooled_projections=y.float(),
                               timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        packed.to(torch.bfloat16)
        m32 = flux_model.Flux(**config, dtype=torch.float32, operations=ops.disable_weight_init)
        m32.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        out32 = comfy_out(m32.eval(), timestep, guidance, torch.float32)
        del m32
    report["forward"] = {"inputs": {"img_tokens": list(img.shape), "txt": list(txt.shape), "y": list(y.shape),
                                    "timestep": 0.7, "guidance": 3.5, "dtype": "bfloat16",
                                    "comfyui_timestep_guidance": [as_embedded["t"].item(), as_embedded["g"].item()]},
                         "packed_output_std": round(ref.float().std().item(), 4), "finite": bool(torch.isfinite(out).all()),
                         "shape": list(out.shape), "rel_l2_error_vs_packed": rel(ref, out), "threshold": 3e-2,
                         "rel_l2_error_vs_packed_comfyui_given_3.5": rel(ref, out_raw),
                         "rel_l2_error_fp32_both": rel(ref32, out32),
                         "rel_l2_packed_bf16_vs_packed_fp32": rel(ref32, ref)}
    print(f"ComfyUI Flux vs bitflux packed model: relative L2 error {report['forward']['rel_l2_error_vs_packed']:.3e} "
          f"(guidance 3.5 as given: {report['forward']['rel_l2_error_vs_packed_comfyui_given_3.5']:.3e}; "
          f"both fp32: {report['forward']['rel_l2_error_fp32_both']:.3e})", file=sys.stderr)

    h = 3072
    controls = {
        "double_blocks.0.img_attn.qkv with its q and k thirds swapped": swapped(sd, "double_blocks.0.img_attn.qkv", slice(0, h), slice(h, 2 * h)),
        "single_blocks.0.linear1 with its q part and the first 3072 rows of its mlp part swapped":
            swapped(sd, "single_blocks.0.linear1", slice(0, h), slice(3 * h, 4 * h)),
    }
    report["controls"] = {}
    for name, state in controls.items():
        del model
        model, missing, unexpected = comfy_model(state)
        with torch.no_grad():
            err = rel(ref, comfy_out(model))
        report["controls"][name] = {"loaded_without_key_errors": not missing and not unexpected, "rel_l2_error_vs_packed": err}
        print(f"control, {name}: relative L2 error {err:.3e}", file=sys.stderr)

    fwd = report["forward"]["rel_l2_error_vs_packed"]
    report["outcome"] = {
        "detected_as_flux_with_file_config": report["detection"]["ok"],
        "strict_load": report["load"]["strict_ok"],
        "matches_packed_model": fwd < 3e-2,
        "controls_fail": all(c["rel_l2_error_vs_packed"] > max(3e-2, 10 * fwd) for c in report["controls"].values()),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
