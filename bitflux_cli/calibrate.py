"""The calibrate stage: the FP teacher over the calibration prompts -> ``<workdir>/calib/``.

Per prompt (global index ``g``), the pipeline runs ``calibration.steps`` denoising steps from the
noise of seed ``calibration.seed + g``; ``calibration.timesteps`` of those steps are drawn, one per
stratum, from a generator of ``g`` as well, so a prompt's record depends on nothing but its index.
At the drawn steps it records:

- for every quantized linear, the input sums ``sq_sum`` [K] (float64, sum of x^2), ``absmax`` [K]
  and ``rows`` (vectors summed): sums and counts, so shards merge exactly;
- for every ``record_every``-th prompt, the transformer's keyword arguments (``calls.*``), the
  teacher's velocity (``calls.velocity``) and each block's image-stream output at
  ``calibration.tokens`` drawn image tokens (``blocks.<block>`` [C, tokens, D], at
  ``calls.token_idx``).

Shards (``shard-00000.safetensors``, ``shard_size`` prompts each) are written atomically, with the
fingerprint of what they depend on and each tensor's sha256 in their header (``tensorfile``), and
kept on a rerun when both still hold, so a killed run resumes; a damaged shard, or one of another
calibration, is recomputed. Under ``torchrun`` (``WORLD_SIZE`` > 1) shard i goes to rank
i % world_size and rank 0 merges after a barrier. ``stats.safetensors`` holds the merged
statistics, ``manifest.json`` (written last) the rest and the sha256 of every shard and of the
statistics. ``load_calibration`` checks the files against it (``verify``) before anything is used.
"""

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .artifacts import artifact_path, atomic_file, file_sha256
from .config import Config
from .console import info, progress
from .distributed import init_distributed
from .errors import ArtifactError, BitfluxError, UsageError
from .models import model_id
from .prompts import load_prompts
from .streaming import blocks as _blocks
from .teacher import Embeds, encode, fp_pipeline, free_text_encoders, run_pipeline
from .tensorfile import specs_of, write_tensorfile
from .ternary import scoped_linears
from .verify import VerifiedFile, check_sha256, read_json, remake_hint

FORMAT = 2  # 2: shards and statistics carry a sha256 per tensor, the manifest one per file
REMAKE = "bitflux calibrate"
MANIFEST, STATS = "manifest.json", "stats.safetensors"
HOST = torch.device("cpu")  # where the recorder keeps a shard's records: their size grows with the calls a shard records
CALL_KEYS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def fingerprint(cfg: Config, prompts_sha256: str) -> str:
    """What a shard's content depends on; a shard with another fingerprint is recomputed."""
    gen = cfg.generate
    key = {"format": FORMAT, "model": model_id(cfg.model), "dtype": cfg.model.dtype, "prompts": prompts_sha256,
           "calibration": cfg.calibration.model_dump(mode="json", exclude={"prompts"}),
           "generate": [gen.height, gen.width, gen.guidance, gen.max_sequence_length]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _schedule(cfg: Config, g: int, image_tokens: int) -> tuple[set[int], torch.Tensor]:
    """The recorded steps of prompt ``g`` (one per stratum) and its recorded image tokens [tokens]."""
    c = cfg.calibration
    gen = torch.Generator().manual_seed(1_000_003 * (c.seed + 1) + g)
    k = min(c.timesteps, c.steps)
    edges = torch.linspace(0, c.steps, k + 1).round().long().tolist()
    steps = {int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in zip(edges, edges[1:])}
    tokens = torch.randperm(image_tokens, generator=gen)[: c.tokens].sort().values
    return steps, tokens


class _Recorder:
    """Hooks on the transformer, its blocks and its quantized linears for one batch of prompts."""

    def __init__(self, transformer, names: list[str]):
        self.transformer, self.names = transformer, names
        self.stats = {n: {"sq_sum": None, "absmax": None, "rows": 0} for n in names}
        self.calls, self.blocks = [], {}
        self.handles = [transformer.register_forward_pre_hook(self._on_call, with_kwargs=True),
                        transformer.register_forward_hook(self._on_velocity)]
        self.handles += [transformer.get_submodule(n).register_forward_pre_hook(self._on_linear(n)) for n in names]
        self.handles += [b.register_forward_hook(self._on_block(n)) for n, b in _blocks(transformer)]

    def start(self, indices: list[int], schedules: list[tuple[set[int], torch.Tensor]], record: list[bool]):
        self.indices, self.schedules, self.record, self.step = indices, schedules, record, -1

    def _on_call(self, _m, _args, kwargs):
        self.step += 1
        self.mask = torch.tensor([self.step in s for s, _ in self.schedules])  # [B] stats rows
        self.keep = self.mask & torch.tensor(self.record)  # [B] recorded calls
        if self.keep.any():
            rows = self.keep.nonzero().flatten().tolist()
            call = {k: kwargs[k][self.keep].detach().to(HOST, copy=True) for k in CALL_KEYS if kwargs.get(k) is not None}
            call["prompt_index"] = torch.tensor([self.indices[r] for r in rows])
            call["step"] = torch.full((len(rows),), self.step)
            call["token_idx"] = torch.stack([self.schedules[r][1] for r in rows])  # [c, tokens]
            self.ids = {"ids.txt": kwargs["txt_ids"].to(HOST, copy=True), "ids.img": kwargs["img_ids"].to(HOST, copy=True)}
            self.calls.append(call)

    def _on_velocity(self, _m, _args, out):
        if self.keep.any():
            self.calls[-1]["velocity"] = out[0][self.keep].detach().to(HOST, copy=True)

    def _on_linear(self, name):
        def hook(_m, args):
            if not self.mask.any():
                return
            x = args[0][self.mask].detach().reshape(-1, args[0].shape[-1])  # [rows, K]
            s = self.stats[name]
            # a 16-bit float squares exactly in fp32 (at most 22 mantissa bits): half the temporary of fp64
            wide = x.float() if x.element_size() == 2 else x.double()  # [rows, K]
            sq, amax = wide.square_().sum(0, dtype=torch.float64), x.abs().amax(0).float()
            s["sq_sum"] = sq if s["sq_sum"] is None else s["sq_sum"] + sq
            s["absmax"] = amax if s["absmax"] is None else torch.maximum(s["absmax"], amax)
            s["rows"] += x.shape[0]
        return hook

    def _on_block(self, name):
        def hook(_m, _args, out):
            if self.keep.any():
                hid = out[1][self.keep]  # [c, L, D] image stream
                idx = self.calls[-1]["token_idx"]  # [c, tokens]
                self.blocks.setdefault(name, []).append(
                    torch.gather(hid, 1, idx[..., None].to(hid.device).expand(-1, -1, hid.shape[-1])).detach().to(HOST, copy=True))
        return hook

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything recorded so far, flat keys for safetensors."""
        out = {}
        for n, s in self.stats.items():
            if s["rows"]:
                out |= {f"stats.{n}.sq_sum": s["sq_sum"], f"stats.{n}.absmax": s["absmax"],
                        f"stats.{n}.rows": torch.tensor([s["rows"]])}
        if self.calls:
            out |= {f"calls.{k}": torch.cat([c[k] for c in self.calls]) for k in self.calls[0]} | self.ids
            out |= {f"blocks.{n}": torch.cat(v) for n, v in self.blocks.items()}
        return {k: v.contiguous() for k, v in out.items()}

    def close(self):
        for h in self.handles:
            h.remove()


def _run_shard(cfg: Config, pipe, names: list[str], prompts: Embeds, first: int, advance) -> dict:
    c = cfg.calibration
    gen = cfg.generate.model_copy(update={"steps": c.steps})
    image_tokens = (gen.height // pipe.vae_scale_factor // 2) * (gen.width // pipe.vae_scale_factor // 2)
    rec = _Recorder(pipe.transformer, names)
    try:
        for b in range(0, len(prompts), c.batch):
            idx = list(range(first + b, first + min(b + c.batch, len(prompts))))
            rec.start(idx, [_schedule(cfg, g, image_tokens) for g in idx], [g % c.record_every == 0 for g in idx])
            with torch.no_grad():
                run_pipeline(pipe, prompts[b: b + c.batch], gen, c.seed + idx[0], output_type="latent")
            advance(len(idx))
    finally:
        rec.close()
    return rec.tensors()


def _shard_path(path: Path, i: int) -> Path:
    return path / f"shard-{i:05d}.safetensors"


def _embeds_path(path: Path, i: int) -> Path:  # a shard's text embeddings until the shard is done
    return path / f".embeds-{i:05d}.safetensors"


def _listed(path: Path, fp: str) -> dict[str, str]:
    """{file: sha256} from the manifest in ``path`` when it is readable and of fingerprint ``fp``, else {}."""
    try:
        m = read_json(path / MANIFEST, REMAKE)
    except BitfluxError:  # missing or damaged: the shards' own checksums decide
        return {}
    entries = m.get("shards") if m.get("fingerprint") == fp else None
    return {e["file"]: e["sha256"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)
            and isinstance(e.get("sha256"), str)} if isinstance(entries, list) else {}


def _shard_state(file: Path, fp: str, listed: dict[str, str]) -> str:
    """"done" when a finished shard can be kept: fingerprint ``fp``, every tensor matching its sha256,
    and the file matching what a manifest of ``fp`` recorded for it; else "missing", "foreign" or "damaged"."""
    if not file.is_file():
        return "missing"
    try:
        f = VerifiedFile(file, REMAKE)
        if f.metadata.get("fingerprint") != fp:
            return "foreign"
        f.read_all()
        if file.name in listed and file_sha256(file) != listed[file.name]:
            return "damaged"
    except ArtifactError:
        return "damaged"
    return "done"


def merge_stats(files: list[Path]) -> dict[str, torch.Tensor]:
    """Sum ``sq_sum`` and ``rows`` and take the max of ``absmax`` over shards, in the given order."""
    merged: dict[str, torch.Tensor] = {}
    for file in files:
        f = VerifiedFile(file, REMAKE)
        for k in f.names:
            if not k.startswith("stats."):
                continue
            v = f.read(k)
            if k not in merged:
                merged[k] = v
            else:
                merged[k] = torch.maximum(merged[k], v) if k.endswith(".absmax") else merged[k] + v
    return merged


def _num_calls(file: Path) -> int:
    entries = VerifiedFile(file, REMAKE).file.entries
    return entries["calls.step"].shape[0] if "calls.step" in entries else 0


def _self_sha256(manifest: dict) -> str:
    """sha256 of the manifest's content but its own ``sha256``: an edit anywhere in it shows."""
    rest = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _entry(file: Path) -> dict:
    return {"file": file.name, "sha256": file_sha256(file), "bytes": file.stat().st_size}


def calibrate(cfg: Config) -> dict:
    """Record the teacher's statistics and calls over the calibration prompts into ``<workdir>/calib``.

    Resumes from finished shards; under torchrun each rank takes shards ``i % world_size == rank``.
    """
    start = time.perf_counter()
    rank, world = init_distributed()
    c = cfg.calibration
    ps = load_prompts(c.prompts.sets, c.prompts.data_dir, c.prompts.limit, c.prompts.seed)
    path = artifact_path(cfg.workdir, "calibrate")
    path.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, ps.sha256)
    n_shards = -(-len(ps.prompts) // c.shard_size)
    listed = _listed(path, fp)
    states = {i: _shard_state(_shard_path(path, i), fp, listed) for i in range(n_shards) if i % world == rank}
    mine = [i for i, state in states.items() if state != "done"]
    for i in set(states) - set(mine):  # a kill between a shard's rename and its embeds' removal left them
        _embeds_path(path, i).unlink(missing_ok=True)
    bad = [f"{_shard_path(path, i).name} ({'of another calibration' if s == 'foreign' else s})"
           for i, s in states.items() if s in ("foreign", "damaged")]
    if bad:
        info(f"recomputing {len(bad)} shards: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")
    todo = sum(len(ps.prompts[i * c.shard_size:(i + 1) * c.shard_size]) for i in mine)
    where = "" if world == 1 else f" on rank {rank} of {world}"
    info(f"calibrating on {len(ps.prompts)} prompts in {n_shards} shards: {len(mine)} to compute{where}")
    if mine:
        with fp_pipeline(cfg) as (pipe, _):
            pipe.set_progress_bar_config(disable=True)
            # the text encoders run once over the prompts, their outputs wait on disk, and they are freed
            for i in mine:
                shard = ps.prompts[i * c.shard_size:(i + 1) * c.shard_size]
                e = encode(pipe, shard, cfg.generate.max_sequence_length, c.batch)
                with atomic_file(_embeds_path(path, i)) as tmp:
                    save_file({"prompt_embeds": e.prompt_embeds, "pooled_prompt_embeds": e.pooled_prompt_embeds}, str(tmp))
            free_text_encoders(pipe)
            names = [n for n, _ in scoped_linears(pipe.transformer)]
            with progress("calibrate", todo, "prompts") as advance:
                for i in mine:
                    first = i * c.shard_size
                    embeds = Embeds(**load_file(str(_embeds_path(path, i))))
                    tensors = _run_shard(cfg, pipe, names, embeds, first, advance)
                    write_tensorfile(_shard_path(path, i), specs_of(tensors.items()), {"fingerprint": fp, "first": str(first)})
                    _embeds_path(path, i).unlink()
    if world > 1:
        dist.barrier()
    files = [_shard_path(path, i) for i in range(n_shards)]
    if rank == 0:
        write_tensorfile(path / STATS, specs_of(merge_stats(files).items()), {"fingerprint": fp})
        # only the sections calibration depends on: the same calibration gives the same manifest (and
        # quantize, which records its sha256, the same checkpoint) whichever command ran it, in any workdir
        config = {k: v for k, v in cfg.resolved().items() if k in ("model", "calibration", "generate")}
        manifest = {"stage": "calibrate", "format": FORMAT, "fingerprint": fp, "model": model_id(cfg.model),
                    "config": config, "prompts_sha256": ps.sha256, "counts": ps.counts,
                    "shards": [_entry(f) for f in files], "stats": _entry(path / STATS)}
        manifest["sha256"] = _self_sha256(manifest)
        with atomic_file(path / MANIFEST) as tmp:  # last: a manifest means every file it lists is whole
            with open(tmp, "w") as f:
                f.write(json.dumps(manifest, indent=1))
                f.flush()
                os.fsync(f.fileno())
    if world > 1:
        dist.barrier()
    calls = sum(_num_calls(f) for f in files)
    return {"stage": "calibrate", "path": str(path), "prompts": len(ps.prompts), "shards": n_shards,
            "computed_shards": len(mine), "calls": calls, "seconds": time.perf_counter() - start, "counts": ps.counts}


@dataclass
class Calibration:
    """The calibrate stage's artifact, verified: merged linear statistics and the shards with the
    teacher's calls. ``fingerprint`` is the one every file was checked to carry."""

    path: Path
    stats: dict[str, torch.Tensor]
    shards: list[Path]
    fingerprint: str = ""

    def second_moment(self, name: str) -> torch.Tensor:
        """E[x_k^2] of the inputs of linear ``name``: [K] fp32."""
        try:
            sq, rows = self.stats[f"stats.{name}.sq_sum"], self.stats[f"stats.{name}.rows"]
        except KeyError:
            raise ArtifactError(f"{self.path / STATS} holds no statistics for {name}: {remake_hint(REMAKE)}") from None
        d = (sq / rows.double()).float()
        if sq.dim() != 1 or rows.numel() != 1 or int(rows) <= 0 or not bool(torch.isfinite(d).all() and (d >= 0).all()):
            raise ArtifactError(f"{self.path / STATS}: the statistics of {name} are not finite non-negative sums "
                                f"over a positive count: {remake_hint(REMAKE)}")
        return d

    def records(self, select: Callable[[str], bool] = lambda key: True, limit: int | None = None) -> dict[str, torch.Tensor]:
        """The recorded calls (``calls.*``, ``ids.*``) and block outputs (``blocks.*``) whose key
        ``select`` accepts, concatenated over the shards (in order, up to the one that reaches ``limit``
        calls when given); only those are read from disk, each checked against its sha256 (and each
        shard against the fingerprint) as it is read."""
        parts: dict[str, list[torch.Tensor]] = {}
        for file in self.shards:
            if limit is not None and sum(len(t) for t in parts.get("calls.step", [])) >= limit:
                break
            f = VerifiedFile(file, REMAKE)
            if self.fingerprint and f.metadata.get("fingerprint") != self.fingerprint:
                raise ArtifactError(_foreign(file))
            for k in f.names:
                if not k.startswith("stats.") and (k.startswith("ids.") or k == "calls.step" or select(k)):
                    parts.setdefault(k, []).append(f.read(k))
        if "calls.step" not in parts:
            raise UsageError(f"{self.path} holds no teacher calls: lower calibration.record_every")
        try:
            return {k: v[0] if k.startswith("ids.") else torch.cat(v) for k, v in parts.items()}
        except RuntimeError:  # shards of one fingerprint agree; these do not
            raise ArtifactError(f"{self.path}: its shards' records do not fit together: {remake_hint(REMAKE)}") from None


def teacher_kwargs(records: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device) -> dict:
    """Keyword arguments of the transformer for the recorded calls ``idx`` [B], batched, on ``device``."""
    kw = {k: records[f"calls.{k}"][idx] for k in CALL_KEYS if f"calls.{k}" in records}
    kw |= {"txt_ids": records["ids.txt"], "img_ids": records["ids.img"]}
    return {k: v.to(device) for k, v in kw.items()} | {"return_dict": False}


def _foreign(file: Path) -> str:
    return (f"{file} was made for another calibration (another config, model, prompt set or bitflux version): "
            f"{remake_hint(REMAKE)}")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _verified(path: Path, fp: str, n_shards: int) -> Calibration:
    """The calibration in ``path``, every file it lists checked against ``manifest.json``: present, made
    for fingerprint ``fp`` (a shard of another calibration is refused by it) and of the recorded sha256."""
    manifest = path / MANIFEST
    m = read_json(manifest, REMAKE)
    if m.get("sha256") != _self_sha256(m):
        raise ArtifactError(f"{manifest}: damaged or edited (its content does not match its own sha256): {remake_hint(REMAKE)}")
    names = [_shard_path(path, i).name for i in range(n_shards)]
    try:
        files = [*m["shards"], m["stats"]]
        ok = ([e["file"] for e in files] == [*names, STATS] and m["fingerprint"] == fp and m["format"] == FORMAT
              and all(isinstance(e["sha256"], str) and _SHA256.fullmatch(e["sha256"]) for e in files))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ArtifactError(f"{manifest}: it does not list this calibration's {n_shards} shards and statistics "
                            f"with their sha256: {remake_hint(REMAKE)}")
    for e in files:
        file = path / e["file"]
        if VerifiedFile(file, REMAKE).metadata.get("fingerprint") != fp:
            raise ArtifactError(_foreign(file))
        check_sha256(file, e["sha256"], manifest, REMAKE)
    return Calibration(path, VerifiedFile(path / STATS, REMAKE).read_all(), [path / n for n in names], fp)


def load_calibration(cfg: Config) -> Calibration:
    """The workdir's calibration for this config, verified against its manifest; ``calibrate`` runs (or
    resumes) first when there is none or it was made for another config. A damaged or replaced file is
    refused in one line naming it and ``bitflux calibrate``, which remakes it."""
    c = cfg.calibration
    path = artifact_path(cfg.workdir, "calibrate")
    ps = load_prompts(c.prompts.sets, c.prompts.data_dir, c.prompts.limit, c.prompts.seed)
    fp = fingerprint(cfg, ps.sha256)
    m = read_json(path / MANIFEST, REMAKE) if (path / MANIFEST).is_file() else None
    # another config's or an earlier format's manifest is remade; a damaged one is refused by _verified
    if m is None or m.get("format") != FORMAT or (m.get("sha256") == _self_sha256(m) and m.get("fingerprint") != fp):
        info("no calibration for this config in the workdir: running calibrate first")
        calibrate(cfg)
    return _verified(path, fp, -(-len(ps.prompts) // c.shard_size))
