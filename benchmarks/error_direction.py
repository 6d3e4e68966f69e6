"""Where does the 1.58-bit model's velocity error point? For each counting caption of the mini world
(training and held out), at the teacher's own denoising calls: the cosine between the packed model's
error v_q - v_fp and the FP model's change of velocity when the caption becomes a neighbour (one word
changed: "three circles" -> "two circles", "three squares"), and ``beta``, how far along that change the
error goes; the same for the FP model with seeded Gaussian weight noise (0.2 of each row's RMS,
``noise_curve.py``'s level with the ternary model's velocity error), whose error points nowhere in
particular.

A diagnostic, not a method. Usage (about 30 s on 2 CPU cores, after ``make demo``):
    python benchmarks/error_direction.py runs/demo benchmarks/results/error-direction.json
"""

import argparse
import copy
import json
import sys

import numpy as np
import torch
from noise_curve import weight_noise  # benchmarks/, the script's own folder

from bitflux_cli.config import load_config, parse_assignments
from bitflux_cli.loader import pipeline_for
from bitflux_cli.miniworld.world import prompts
from bitflux_cli.teacher import encode, fp_pipeline, record_transformer_calls
from bitflux_cli.ternary import scoped_linears

NOISE = 0.2  # of each row's RMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a workdir with a packed checkpoint of the embedded model (make demo's: runs/demo)")
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--images", type=int, default=32, help="images (seeds) a caption")
    parser.add_argument("--calls", type=int, default=4, help="denoising steps compared, evenly spaced")
    args = parser.parse_args()
    cfg = load_config(None, {"workdir": args.workdir}, parse_assignments([]))
    held_out = {s.objects[0] for s in prompts("counting", "test")}
    counting = {s.objects[0]: s.caption for s in prompts("counting", "all")}  # {ObjectSpec: caption}
    report = {"command": f"python benchmarks/error_direction.py {' '.join(sys.argv[1:])}", "weight_noise": NOISE,
              "images": args.images, "calls": args.calls, "captions": {}}
    with fp_pipeline(cfg) as (fp, _), pipeline_for(cfg) as (packed, _):
        fp.set_progress_bar_config(disable=True)
        models = {"1.58-bit": packed.transformer, f"weight noise {NOISE}": _noisy(fp.transformer)}
        for obj, caption in counting.items():
            calls, _ = record_transformer_calls(fp, [caption] * args.images, cfg.generate, seed=2000, keep=args.calls)
            neighbours = {c: encode(fp, [c] * args.images, cfg.generate.max_sequence_length)
                          for o, c in counting.items() if (o.count == obj.count) != (o.shape == obj.shape)}
            report["captions"][caption] = {"held_out": obj in held_out, "neighbours": {
                c: _alignment(fp.transformer, models, calls, e) for c, e in neighbours.items()}}
            print(caption, json.dumps({c: {m: r["cos"][0] for m, r in v.items()}
                                       for c, v in report["captions"][caption]["neighbours"].items()}), flush=True)
    report["summary"] = {  # mean |cos| at the first (high-noise) call, over neighbours and captions
        split: {m: round(float(np.mean([abs(v[m]["cos"][0]) for r in report["captions"].values() if r["held_out"] == (split == "held out")
                                        for v in r["neighbours"].values()])), 3) for m in models}
        for split in ("held out", "training")}
    print(json.dumps(report["summary"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


@torch.no_grad()
def _alignment(fp: torch.nn.Module, models: dict, calls: list[dict], neighbour) -> dict:
    """{model: {"cos": [calls], "beta": [calls]}}: means over the images of cos(e, d) and <e, d> / |d|^2,
    e = v_model - v_fp and d = v_fp(neighbour's text) - v_fp, at each call."""
    out = {m: {"cos": [], "beta": []} for m in models}
    for kw in calls:
        v = fp(**kw)[0]  # [B, L, C]
        moved = dict(kw, encoder_hidden_states=neighbour.prompt_embeds, pooled_projections=neighbour.pooled_prompt_embeds)
        d = (fp(**moved)[0] - v).flatten(1)  # [B, L*C]
        for m, model in models.items():
            e = (model(**kw)[0] - v).flatten(1)
            dot = (e * d).sum(1)
            out[m]["cos"].append(round((dot / (e.norm(dim=1) * d.norm(dim=1))).mean().item(), 4))
            out[m]["beta"].append(round((dot / d.square().sum(1)).mean().item(), 4))
    return out


@torch.no_grad()
def _noisy(transformer: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(transformer)
    gen = torch.Generator().manual_seed(0)
    for _, m in scoped_linears(out):
        m.weight.add_(weight_noise(m.weight, NOISE, gen))
    return out


if __name__ == "__main__":
    main()
