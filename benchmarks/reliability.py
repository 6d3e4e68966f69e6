"""Crash safety, measured: each stage is killed with SIGKILL at several points, then rerun.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability.py benchmarks/results/reliability.json [--quick] [--work DIR]

On the embedded tiny model (4 calibration prompts in 2 shards, 2 steps) the chain calibrate ->
quantize absmean -> pack -> quantize act-aware -> pack -> quantize block-recon -> quantize distill
runs once uninterrupted (the reference; every artifact's sha256 is kept after each command). Then,
for every command and kill point, the workdir is put back in the reference state before that
command, the command starts as a subprocess, and its process group gets SIGKILL at the point:

- a file event (inotify, seen within about a millisecond): a temp file created or opened for writing
  (``create``, ``modify`` #1: a 0-byte temp), a temp file grown past a size (``size``: a partly
  written file; inotify merges a burst of writes into one event, so sizes, not write counts), an
  artifact renamed into place (``moved``), a distill state written for the n-th time;
- a time: a fraction of the command's uninterrupted duration (most of it is imports and loading).

After the kill: every file under its final name must be byte-identical to the reference before or
after the command (a partial write may only exist as a temp file); the next stage must refuse the
workdir or give the reference result for the artifact it found (it never reads a temp file); the
command rerun must exit 0, leave the workdir byte-identical to the reference after the command, and
leave no temp file behind. A kill point the command passed before the trigger fired is reported as
"not reached", never counted as a pass.

This process imports neither torch nor bitflux; ``tests/test_reliability_crash.py`` runs a short
version in the suite with the same functions.
"""

import argparse
import ctypes
import fnmatch
import hashlib
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BITFLUX = str(Path(sys.executable).with_name("bitflux"))
ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
                    "TRANSFORMERS_VERBOSITY": "error"}
SETTINGS = ["calibration.prompts.sets=[mini]", "calibration.prompts.limit=4", "calibration.steps=2",
            "calibration.shard_size=2", "calibration.batch=2", "quantization.eval_prompts=1",
            "quantization.act_aware.thresholds=4", "quantization.block_recon.steps=2", "quantization.block_recon.batch=2",
            "quantization.distill.steps=6", "quantization.distill.save_every=2", "quantization.distill.batch=2",
            "quantization.distill.init=absmean"]
# name -> command; the chain runs them in this order
CHAIN = {
    "calibrate": ["calibrate"],
    "quantize absmean": ["quantize", "--method", "absmean"],
    "pack absmean": ["pack"],
    "quantize act-aware": ["quantize", "--method", "act-aware"],
    "pack act-aware": ["pack"],
    "quantize block-recon": ["quantize", "--method", "block-recon"],
    "pack block-recon": ["pack"],
    "quantize distill": ["quantize", "--method", "distill"],
    "pack distill": ["pack"],
}
# the stage that reads what a command writes, run after a kill: it must refuse or use a whole artifact
CONSUMER = {"calibrate": ["quantize", "--method", "act-aware"], "quantize": ["pack"], "pack": None}
# kill points per command: (kind, pattern or fraction, n): the n-th matching event
EVENTS = {  # sizes of the tiny model's files: shard 306 kB, stats 160 kB, ternary 3.0 MB, packed 1.4 MB
    "calibrate": [("moved", "calib/.embeds-00001.safetensors", 1), ("modify", "calib/.shard-00000.safetensors.*.tmp", 1),
                  ("moved", "calib/shard-00000.safetensors", 1), ("size", "calib/.shard-00001.safetensors.*.tmp", 100_000),
                  ("size", "calib/.stats.safetensors.*.tmp", 50_000), ("create", "calib/.manifest.json.*.tmp", 1)],
    "quantize": [("moved", "ternary/.parts-*/000.safetensors", 1), ("moved", "ternary/.parts-*/004.safetensors", 1),
                 ("modify", "ternary/.parts-*/.transformer.safetensors.*.tmp", 1), ("size", "ternary/.parts-*/.transformer.safetensors.*.tmp", 1_000_000),
                 ("size", "ternary/.parts-*/.transformer.safetensors.*.tmp", 2_500_000), ("moved", "ternary/transformer.safetensors", 1)],
    "pack": [("modify", "packed/.transformer.safetensors.*.tmp", 1), ("size", "packed/.transformer.safetensors.*.tmp", 500_000),
             ("size", "packed/.transformer.safetensors.*.tmp", 1_200_000), ("moved", "packed/transformer.safetensors", 1)],
    "distill": [("moved", "distill/state.safetensors", 1), ("size", "distill/.state.safetensors.*.tmp", 1_000_000),
                ("moved", "distill/state.safetensors", 2)],
}
FRACTIONS = (0.5, 0.9)

# inotify (linux/inotify.h)
IN_MODIFY, IN_MOVED_TO, IN_CREATE, IN_ISDIR, IN_Q_OVERFLOW, IN_IGNORED = 0x2, 0x80, 0x100, 0x40000000, 0x4000, 0x8000
KINDS = {"modify": IN_MODIFY, "moved": IN_MOVED_TO, "create": IN_CREATE}
_libc = ctypes.CDLL(None, use_errno=True)


class Watcher:
    """inotify on a directory tree: ``events(timeout)`` yields (kind, path relative to the root).

    Directories created later are watched as they appear; what was made in them before the watch
    was added is reported as created.
    """

    def __init__(self, root: Path):
        self.root, self.dirs = Path(root), {}
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.pending: list[tuple[str, str]] = []
        self._watch(self.root, report=False)

    def _watch(self, path: Path, report: bool) -> None:
        wd = _libc.inotify_add_watch(self.fd, str(path).encode(), IN_MODIFY | IN_MOVED_TO | IN_CREATE)
        if wd < 0:
            return  # removed again already
        self.dirs[wd] = path
        for child in sorted(path.iterdir()) if path.is_dir() else []:
            if report:
                self.pending.append(("create", str(child.relative_to(self.root))))
            if child.is_dir():
                self._watch(child, report)

    def events(self, timeout: float):
        out, self.pending = self.pending, []
        if not out and select.select([self.fd], [], [], timeout)[0]:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                data = b""
            i = 0
            while i < len(data):
                wd, mask, _cookie, n = struct.unpack_from("iIII", data, i)
                name = data[i + 16:i + 16 + n].rstrip(b"\0").decode()
                i += 16 + n
                if mask & IN_Q_OVERFLOW or wd not in self.dirs:
                    continue
                kind = next((k for k, m in KINDS.items() if mask & m), None)
                if kind is None:
                    if mask & IN_IGNORED:  # a watched directory went away
                        del self.dirs[wd]
                    continue
                path = self.dirs[wd] / name
                out.append((kind, str(path.relative_to(self.root))))
                if mask & IN_ISDIR and kind in ("create", "moved"):
                    self._watch(path, report=True)
            out += self.pending
            self.pending = []
        return out

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Trigger:
    """Kill at the ``n``-th event ``kind`` on a path matching ``pattern`` (``size``: the first write that
    leaves it at ``n`` bytes or more), or after ``seconds``."""

    kind: str  # create, modify, moved, size or time
    pattern: str = ""
    n: int = 1
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.kind == "time":
            return f"after {self.seconds:.1f} s"
        return f"{self.pattern} >= {self.n} bytes" if self.kind == "size" else f"{self.kind} {self.pattern} #{self.n}"

    def matches(self, kind: str, path: str, root: Path) -> bool:
        """Whether event ``kind`` on ``path`` is one this trigger counts."""
        if not fnmatch.fnmatch(path, self.pattern):
            return False
        if self.kind == "size":
            try:
                return kind == "modify" and (root / path).stat().st_size >= self.n
            except FileNotFoundError:
                return False
        return kind == self.kind


@dataclass
class Killed:
    trigger: str
    reached: bool  # the trigger fired while the command ran, and it was killed
    returncode: int
    at: float  # seconds after the start
    stderr: str = ""
    leftovers: dict = field(default_factory=dict)  # temp files at the kill: path -> bytes


def cli(args: list[str], workdir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``bitflux <args> --workdir <workdir>`` with the harness settings, to the end."""
    return subprocess.run(command(args, workdir), env=ENV, capture_output=True, text=True, timeout=timeout)


def command(args: list[str], workdir: Path) -> list[str]:
    return [BITFLUX, *args, "--workdir", str(workdir), *[x for s in SETTINGS for x in ("--set", s)]]


def run_killed(args: list[str], workdir: Path, trigger: Trigger, timeout: float = 600) -> Killed:
    """Start ``bitflux <args>`` and SIGKILL its process group at ``trigger`` (if it comes before the end)."""
    watcher = Watcher(workdir)
    start = time.monotonic()
    proc = subprocess.Popen(command(args, workdir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    seen, fired = 0, False
    try:
        while proc.poll() is None and time.monotonic() - start < timeout:
            if trigger.kind == "time":
                wait = trigger.seconds - (time.monotonic() - start)
                if wait <= 0:
                    fired = True
                else:
                    watcher.events(min(wait, 0.2))
            else:
                for kind, path in watcher.events(0.2):
                    if trigger.matches(kind, path, workdir):
                        seen += 1
                        if trigger.kind == "size" or seen == trigger.n:
                            fired = True
                            break
            if fired:
                alive = proc.poll() is None
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                at = time.monotonic() - start
                return Killed(str(trigger), alive and proc.returncode == -signal.SIGKILL, proc.returncode, at,
                              proc.stderr.read(), temps(workdir))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return Killed(str(trigger), False, proc.returncode, time.monotonic() - start, proc.stderr.read())
    finally:
        watcher.close()
        proc.stderr.close()


def is_temp(rel: str) -> bool:
    """A file no stage reads under this name: a temp of an atomic write, a part, the embeds of a running calibrate."""
    return any(part.startswith(".") and not part.startswith(".lock-") for part in Path(rel).parts)


def snapshot(workdir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file in ``workdir`` but the stage locks."""
    out = {}
    for p in sorted(Path(workdir).rglob("*")):
        rel = str(p.relative_to(workdir))
        if p.is_file() and not p.name.startswith(".lock-"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temps(workdir: Path) -> dict[str, int]:
    return {rel: (Path(workdir) / rel).stat().st_size for rel in snapshot(workdir) if is_temp(rel)}


RESUME_STATES = ("distill/state.safetensors",)  # rewritten as training goes: an earlier step's file is whole, not partial


def whole_tensorfile(path: Path) -> bool:
    """Whether ``path`` is a complete tensorfile: its header parses and every tensor's bytes match the
    sha256 its metadata records (``checksums``), in plain Python."""
    try:
        raw = Path(path).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        sums = json.loads(header.pop("__metadata__")["checksums"])
        return sums.keys() == header.keys() and all(
            hashlib.sha256(raw[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]]).hexdigest() == sums[k]
            and 8 + n + e["data_offsets"][1] <= len(raw) for k, e in header.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def partial_artifacts(state: dict[str, str], before: dict[str, str], after: dict[str, str], workdir: Path | None = None) -> list[str]:
    """Files under a final name that are neither the reference before nor after the command (a resume
    state of an intermediate step counts when it is a whole, verified file)."""
    return [rel for rel, sha in state.items() if not is_temp(rel) and sha not in (before.get(rel), after.get(rel))
            and not (rel in RESUME_STATES and workdir is not None and whole_tensorfile(workdir / rel))]


def differences(state: dict[str, str], after: dict[str, str]) -> list[str]:
    """What makes ``state`` differ from the reference ``after``: files missing, extra (temps too) or different."""
    return sorted(rel for rel in state.keys() | after.keys() if state.get(rel) != after.get(rel))


def reference(work: Path, upto: str = list(CHAIN)[-1]) -> tuple[dict[str, Path], dict[str, float]]:
    """Run the chain uninterrupted in ``work/wd`` up to command ``upto``; a copy of the workdir after
    each command, and its duration."""
    workdir, states, seconds = work / "wd", {}, {}
    prev = work / "ref-empty"
    prev.mkdir()
    states["start"] = prev
    for name, args in CHAIN.items():
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.copytree(prev, workdir)
        start = time.monotonic()
        res = cli(args, workdir)
        seconds[name] = time.monotonic() - start
        if res.returncode != 0:
            raise RuntimeError(f"reference {name} failed: {res.stderr.strip()[-500:]}")
        prev = work / f"ref-{name.replace(' ', '-')}"
        shutil.copytree(workdir, prev)
        states[name] = prev
        if name == upto:
            break
    shutil.rmtree(workdir)
    return states, seconds


def trial(work: Path, states: dict[str, Path], name: str, trigger: Trigger, consume: bool = True) -> dict:
    """One kill point of command ``name``: kill, check the workdir, run the consumer, rerun, compare."""
    names = list(CHAIN)
    before_dir, after_dir = states[(["start", *names])[names.index(name)]], states[name]
    before, after = snapshot(before_dir), snapshot(after_dir)
    workdir = work / "wd"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(before_dir, workdir)
    stage = CHAIN[name][0]
    killed = run_killed(CHAIN[name], workdir, trigger)
    row = {"command": name, "trigger": killed.trigger, "reached": killed.reached, "killed_at_s": round(killed.at, 2),
           "returncode": killed.returncode, "temps_at_kill": killed.leftovers}
    state = snapshot(workdir)
    row["partial_artifacts"] = partial_artifacts(state, before, after, workdir)
    consumer = CONSUMER[stage] if consume else None
    if consumer:  # in the workdir (artifacts record its path), which is then put back as the kill left it
        saved = work / "killed"
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(workdir, saved)
        res = cli(consumer, workdir)
        row["consumer"] = consumer_verdict(res, workdir, states, stage)
        shutil.rmtree(workdir)
        saved.rename(workdir)
    res = cli(CHAIN[name], workdir)
    row["rerun_returncode"] = res.returncode
    row["rerun_stderr"] = res.stderr.strip().splitlines()[-1:] if res.returncode else []
    row["rerun_differs"] = differences(snapshot(workdir), after)
    row["ok"] = bool(not row["partial_artifacts"] and res.returncode == 0 and not row["rerun_differs"]
                     and row.get("consumer", {}).get("ok", True))
    return row


def consumer_verdict(res: subprocess.CompletedProcess, workdir: Path, states: dict[str, Path], stage: str) -> dict:
    """The consumer either refused in one line (exit 1/2, no traceback), or wrote what the reference
    chain writes from the artifact it found: the consumer is checked against every reference state
    whose input artifact is the one it found."""
    err = res.stderr.strip().splitlines()
    if res.returncode != 0:
        one_line = len([x for x in err if x.startswith("error:")]) == 1 and "Traceback" not in res.stderr
        return {"outcome": "refused", "message": err[-1] if err else "", "ok": one_line and res.returncode in (1, 2)}
    got = snapshot(workdir)
    key = {"calibrate": "ternary/transformer.safetensors", "quantize": "packed/transformer.safetensors"}[stage]
    src = {"calibrate": "calib/manifest.json", "quantize": "ternary/transformer.safetensors"}[stage]
    matches = [n for n, d in states.items() if got.get(key) is not None
               and snapshot(d).get(key) == got.get(key) and snapshot(d).get(src) == got.get(src)]
    return {"outcome": "ran", "matches_reference": matches, "ok": bool(matches)}


def quick_points() -> list[tuple[str, Trigger]]:
    return [("calibrate", Trigger("modify", "calib/.shard-00001.safetensors.*.tmp", 1)),
            ("quantize absmean", Trigger("size", "ternary/.parts-*/.transformer.safetensors.*.tmp", 1_000_000)),
            ("pack absmean", Trigger("size", "packed/.transformer.safetensors.*.tmp", 500_000))]


def all_points(seconds: dict[str, float]) -> list[tuple[str, Trigger]]:
    points = []
    order = ["calibrate", "quantize absmean", "pack absmean", "quantize act-aware", "pack act-aware", "quantize distill",
             "quantize block-recon"]  # pack block-recon and pack distill are references for the consumer check only
    for name in order:
        key = "distill" if name.endswith("distill") else CHAIN[name][0]
        events = EVENTS[key] + (EVENTS["quantize"] if key == "distill" else [])
        points += [(name, Trigger(kind, pattern, n)) for kind, pattern, n in events]
        points += [(name, Trigger("time", seconds=round(f * seconds[name], 2))) for f in FRACTIONS]
    return points


def table(rows: list[dict]) -> str:
    lines = [f"{'command':22} {'kill point':58} {'reached':7} {'partial':7} {'consumer':9} {'rerun':9} ok"]
    for r in rows:
        consumer = r.get("consumer", {}).get("outcome", "-")
        rerun = "same" if r["rerun_returncode"] == 0 and not r["rerun_differs"] else f"DIFF {len(r['rerun_differs'])}"
        lines.append(f"{r['command']:22} {r['trigger'][:58]:58} {str(r['reached']):7} {len(r['partial_artifacts']):<7} "
                     f"{consumer:9} {rerun:9} {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict], planned: int, seconds: dict[str, float], elapsed: float) -> dict:
    summary = {"kill_points": len(rows), "planned": planned, "reached": sum(1 for r in rows if r["reached"]),
               "partial_artifacts": sum(len(r["partial_artifacts"]) for r in rows),
               "consumer_runs": sum(1 for r in rows if "consumer" in r),
               "consumer_refused": sum(1 for r in rows if r.get("consumer", {}).get("outcome") == "refused"),
               "consumer_accepted_bad": sum(1 for r in rows if not r.get("consumer", {}).get("ok", True)),
               "rerun_not_identical": sum(1 for r in rows if r["rerun_returncode"] or r["rerun_differs"]),
               "stale_temps_after_rerun": sorted({d for r in rows for d in r["rerun_differs"] if is_temp(d)}),
               "reference_seconds": {k: round(v, 1) for k, v in seconds.items()}, "seconds": round(elapsed, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "settings": SETTINGS, "summary": summary,
                               "trials": rows}, indent=1) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="three kill points (the suite's), no consumer runs")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--only", help="run only the kill points whose command or trigger contains this text")
    a = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bitflux-reliability-", dir=a.work))
    try:
        start = time.monotonic()
        states, seconds = reference(work, "pack absmean" if a.quick else list(CHAIN)[-1])
        points = quick_points() if a.quick else all_points(seconds)
        points = [(n, t) for n, t in points if not a.only or a.only in n or a.only in str(t)]
        rows = []
        for i, (name, trigger) in enumerate(points):
            rows.append(trial(work, states, name, trigger, consume=not a.quick))
            print(f"[{i + 1}/{len(points)}] {table(rows[-1:]).splitlines()[1]}", file=sys.stderr, flush=True)
            write_results(a.out, rows, len(points), seconds, time.monotonic() - start)  # a partial run still says what it saw
        print(table(rows))
        print(json.dumps(write_results(a.out, rows, len(points), seconds, time.monotonic() - start), indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
