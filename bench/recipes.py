"""Every published recipe end to end at the real image sizes on this CPU: the dry run before renting GPUs.

    python bench/recipes.py [--preset NAME ...] [--scale 1.0] [--frames 3] [--iters 2]
                            [--workdir DIR] [--out bench/results/recipes.json]

For each preset (default: every one not named ``synthetic_*``) it copies the project's tracked files
into ``--workdir/<preset>``, applies the preset, writes a handful of frames of every dataset the
preset names in its real raw layout at the real image size (GTA5 1914x1052 with one frame whose label
has another size, Cityscapes 2048x1024, ACDC and Dark Zurich 1920x1080, BDD100K 1280x720, Mapillary
landscape, portrait and odd-sized), every weights file in its published key layout (random values),
overrides only the iteration counts (``--iters`` per training stage, a checkpoint and a checkpoint
selection at the last one, a log row per iteration, RobustNet's ISW statistics at iteration 1) and
runs the whole ``dvc repro``.  ``--scale`` multiplies every image size and every pixel size of the
recipe (crops, resizes, inference sizes, tiles) for a quick run with the real aspect ratios.

Per stage it records the wall time, the time per unit (a training iteration from the DVCLive
timestamps of iterations 2.., an image from the stage's progress bar), the peak resident memory of
the stage's process tree (sampled every 0.2 s: the largest process and the sum over the tree, which
counts the data loader's workers and their shared pages more than once), the size of its outputs
from dvc.lock, and extrapolates to the full datasets and the recipe's iteration counts: CPU hours
of training (iterations x time per iteration, plus the checkpoint selections), of labelling and
scoring, and the disk of every output.  Writes ``--out`` (JSON) and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.preset import chain as preset_chain  # noqa: E402
from lib.preset import main as apply_preset  # noqa: E402
from tests import layouts as L  # noqa: E402

# (height, width) of the published frames
REAL_SIZES = {"gta5": (1052, 1914), "gtav_split": (1052, 1914), "cityscapes": (1024, 2048),
              "acdc": (1080, 1920), "dark_zurich": (1080, 1920), "bdd100k": (720, 1280)}
GTA5_ODD_LABEL = (1080, 1920)          # a frame whose label is not its image's size (prepare skips it)
MAPILLARY_SIZES = [(3000, 4000), (4032, 3024), (1080, 1920), (2421, 3229)]   # landscape, portrait, 16:9, odd
# images per split of the published datasets (train / val), for the extrapolation
FULL_COUNTS = {"gta5": {"train": 24966}, "gtav_split": {"train": 12403, "val": 6382},
               "cityscapes": {"train": 2975, "val": 500}, "acdc": {"train": 1600, "val": 406},
               "dark_zurich": {"train": 2416, "val": 50}, "bdd100k": {"train": 7000, "val": 1000},
               "mapillary": {"val": 2000}}
PIXEL_PAIRS = ("resize", "crop", "input_size", "window", "stride")   # [h, w] pixel sizes in the params
# stages that run on the host whatever the device (bench/gpu.py's HOST_KINDS)
HOST_STAGES = ("check", "synthesize", "prepare", "stylize", "scratch", "weights", "ensemble", "summary")
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
BAR = re.compile(r"^\s*(.*?):\s+\d+%\|.*?\| *(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<[^,]*, *([\d.]+)(s/[a-z]+|[a-z]+/s)")
BIN = Path(sys.executable).parent         # the environment's `python` and `dvc` first on the stages' PATH
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1",
           DVC_NO_ANALYTICS="1", TQDM_MININTERVAL="1")


# --- the project --------------------------------------------------------------------------------

def copy_project(dest: Path) -> None:
    """The tracked files of this checkout under ``dest``, a git repository of its own."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    for rel in filter(None, tracked):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for rel in ("dvc.lock", "metrics"):     # the default chain's record: not this run's
        shutil.rmtree(dest / rel, ignore_errors=True) if (dest / rel).is_dir() else (dest / rel).unlink(missing_ok=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git[:1], "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "bench/recipes.py"], cwd=dest, check=True)


def scaled(node, scale: float, key: str = ""):
    """``node`` with every pixel size multiplied by ``scale`` (pixel counts by its square)."""
    if isinstance(node, dict):
        return {k: scaled(v, scale, k) for k, v in node.items()}
    if key in PIXEL_PAIRS and isinstance(node, list) and all(isinstance(v, int) for v in node):
        return [max(8, round(v * scale)) for v in node]
    if key in ("scale_width", "height", "crop", "centroid_tile") and isinstance(node, int) and not isinstance(node, bool):
        return max(8, round(node * scale))
    if key == "rcs_min_pixels" and isinstance(node, int):
        return max(1, round(node * scale * scale))
    return node


def capped_workers(node, cap: int, key: str = ""):
    """``node`` with every data loader's ``workers`` at most ``cap`` (more processes than cores only
    add memory: each holds its own copy of the batches it prepares)."""
    if isinstance(node, dict):
        return {k: capped_workers(v, cap, k) for k, v in node.items()}
    if key == "workers" and isinstance(node, int) and node > cap:
        return cap
    return node


def bench_overlay(params: dict, iters: int, scale: float, workers: int, max_batch: int | None = None) -> dict:
    """The keys this bench changes: the iteration counts, the loaders' workers (at most ``workers``),
    at ``scale`` != 1 the pixel sizes, and with ``max_batch`` the training batches (a recipe whose
    step does not fit this machine's memory at its own batch still runs every shape at a smaller one)."""
    short = {"iters": iters, "checkpoint_every": iters, "log_every": 1}
    recipes = {}
    for name, recipe in (params.get("recipes") or {}).items():
        over = {"train": dict(short)}
        batch = (recipe.get("data") or {}).get("batch_size")
        if max_batch and isinstance(batch, int) and batch > max_batch:
            over["data"] = {"batch_size": max_batch}
        if "select" in recipe:
            over["select"] = {"every": iters}
        if name == "robustnet":
            over["method"] = {"statistics_iter": 0}       # the ISW statistics phase in the first (untimed)
            # iteration, once, as in a full run; the timed one carries the ISW loss
        recipes[name] = over
    out = {"recipes": recipes}
    if (params.get("cyclegan") or {}).get("outputs"):
        out["cyclegan"] = {"train": dict(short), "schedule": {"constant_iters": 1}}
    sections = {k: params[k] for k in ("recipes", "datasets", "evaluate", "pseudo_labels", "cyclegan", "prepare",
                                       "stylize") if isinstance(params.get(k), dict)}
    changed = capped_workers(scaled(sections, scale) if scale != 1.0 else sections, workers)
    for key, value in changed.items():
        if value != sections[key]:
            out[key] = merge(value, out.get(key, {}))
    return out


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- raw data and weights -------------------------------------------------------------------------

def size_at(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(16, round(size[0] * scale)), max(16, round(size[1] * scale))


def write_dataset(spec: dict, root: Path, frames: int, scale: float, rng) -> dict[str, int]:
    """Raw frames of one ``datasets`` entry in its layout; returns the frames written per split."""
    layout, splits = spec["layout"], spec.get("splits") or ["train"]
    counts = {s: (frames if s == "train" else 2) for s in splits}
    size = size_at(REAL_SIZES.get(layout, (0, 0)), scale)
    if layout == "gta5":
        L.make_gta5(root, rng, n=frames + 1, size=size, label_sizes={frames + 1: size_at(GTA5_ODD_LABEL, scale)})
        return {"train": frames}
    if layout == "gtav_split":       # the first training frame's label has another size
        folders = {("valid" if s == "val" else s): n + (s == "train") for s, n in counts.items()}
        L.make_gtav_split(root, rng, folders, size=size, label_sizes={1: size_at(GTA5_ODD_LABEL, scale)})
    elif layout == "cityscapes":
        L.make_cityscapes(root, rng, counts, size=size)
    elif layout == "acdc":
        conditions = spec.get("conditions") or ["fog", "night", "rain", "snow"]
        L.make_acdc_native(root, rng, {c: {s: 1 for s in splits} for c in conditions}, size=size)
        counts = {s: len(conditions) for s in splits}
    elif layout == "dark_zurich":
        L.make_dark_zurich(root, rng, {t: frames for t in spec.get("times") or ["night"]}, val=2, size=size)
        counts = {s: (frames * len(spec.get("times") or ["night"]) if s == "train" else 2) for s in splits}
    elif layout == "bdd100k":
        L.make_bdd100k(root, rng, counts, size=size)
    elif layout == "mapillary":
        sizes = [size_at(s, scale) for s in MAPILLARY_SIZES]
        L.make_mapillary(root, rng, sizes=[(max(h, 9), max(w, 9)) for h, w in sizes])
        counts = {"val": len(sizes)}
    else:
        raise SystemExit(f"error: bench/recipes.py has no writer for layout '{layout}'")
    return counts


def write_weights(spec: dict, path: Path) -> None:
    """A weights file in the key layout of ``spec['format']`` (random values)."""
    depth = 50 if "resnet50" in path.name else 101
    state = {"torchvision": lambda: L.torchvision_resnet_state(depth),
             "simclr": lambda: L.simclr_state(L.torchvision_resnet_state(101)),
             "deeplab_caffe": lambda: L.deeplab_caffe_state(L.caffe_reference())}[spec["format"]]()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


# --- one run ----------------------------------------------------------------------------------------

@dataclass
class StageRecord:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0          # the largest single process
    peak_tree_mb: float = 0.0         # the sum over the stage's process tree
    bars: list[Bar] = field(default_factory=list)      # every progress-bar line of the stage


@dataclass(frozen=True)
class Bar:
    desc: str
    n: int
    total: int
    elapsed: float          # seconds since the bar started (whole seconds)
    per_item: float         # tqdm's rate, as seconds per item


def parse_bar(line: str) -> Bar | None:
    """A tqdm line ``desc:  33%|###| 1/3 [00:04<00:08,  4.14s/it, ...]``."""
    m = BAR.search(line)
    if m is None:
        return None
    rate = float(m.group(7))
    per_item = rate if m.group(8).startswith("s/") else (1.0 / rate if rate else 0.0)
    elapsed = int(m.group(4) or 0) * 3600 + int(m.group(5)) * 60 + int(m.group(6))
    return Bar(m.group(1).strip(), int(m.group(2)), int(m.group(3)), float(elapsed), per_item)


def seconds_per_item(bars: list[Bar], n: int, desc: str | None = None) -> float | None:
    """Seconds per item of the last bar that reached ``n``/``n`` (elapsed / n, or tqdm's rate when
    the whole bar took under 5 s, below the elapsed time's resolution)."""
    done = [b for b in bars if b.n == b.total == n and (desc is None or b.desc == desc)]
    if not done:
        return None
    return done[-1].elapsed / n if done[-1].elapsed >= 5 else done[-1].per_item


def last_lines(log) -> str:
    """The end of the log file being written."""
    log.flush()
    with open(log.name, errors="replace") as f:
        return f.read()[-2000:]


def first_iteration_seconds(bars: list[Bar], desc: str, iters: int) -> float | None:
    """Elapsed at the first iteration: the step, the start-up and any one-off phase (ISW's statistics)."""
    first = [b.elapsed for b in bars if b.desc == desc and b.total == iters and b.n == 1]
    return first[0] if first else None


def step_seconds(bars: list[Bar], desc: str, iters: int) -> float | None:
    """Seconds per training iteration after the first: (elapsed at ``iters`` - elapsed at 1) / (iters - 1)."""
    first = first_iteration_seconds(bars, desc, iters)
    last = [b.elapsed for b in bars if b.desc == desc and b.total == iters and b.n == iters]
    if first is None or not last or iters < 2:
        return seconds_per_item(bars, iters, desc)
    step = (last[-1] - first) / (iters - 1)
    return step if last[-1] - first >= 5 else seconds_per_item(bars, iters, desc)


class Watcher:
    """Samples the resident memory of ``pid``'s process tree and charges it to the running stage."""

    def __init__(self, pid: int, period: float = 0.2):
        self.proc, self.period = psutil.Process(pid), period
        self.stage: str | None = None
        self.records: dict[str, StageRecord] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self._stop.set()
        self.thread.join()

    def _run(self):
        while not self._stop.wait(self.period):
            if self.stage is None:
                continue
            try:
                tree = [self.proc, *self.proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = []
            for p in tree:
                try:
                    rss.append(p.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            rec = self.records.setdefault(self.stage, StageRecord())
            # dvc's own process is not the stage's: the largest process is the stage or a worker
            rec.peak_rss_mb = max(rec.peak_rss_mb, max(rss[1:], default=0.0))
            rec.peak_tree_mb = max(rec.peak_tree_mb, sum(rss[1:]))


def run_repro(project: Path, log) -> tuple[dict[str, StageRecord], str | None]:
    """``dvc repro`` in ``project``, timed and sampled stage by stage; (the records, why it failed or None)."""
    dvc = shutil.which("dvc", path=ENV["PATH"]) or sys.exit("error: dvc not found (install the project: make install)")
    proc = subprocess.Popen([dvc, "repro"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=ENV, text=True, bufsize=1)
    watcher = Watcher(proc.pid).start()
    started = time.perf_counter()
    buffer = ""
    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read(1)
        if not chunk:
            break
        buffer += chunk
        if chunk not in "\r\n":
            continue
        line, buffer = buffer, ""
        log.write(line)
        log.flush()
        match = STAGE_LINE.search(line)
        if match:
            now = time.perf_counter()
            if watcher.stage is not None:
                watcher.records.setdefault(watcher.stage, StageRecord()).seconds = now - started
            watcher.stage, started = match.group(1), now
            watcher.records.setdefault(watcher.stage, StageRecord())
        elif watcher.stage is not None and (bar := parse_bar(line)):
            watcher.records[watcher.stage].bars.append(bar)
    code = proc.wait()
    watcher.stop()
    if watcher.stage is not None:
        watcher.records[watcher.stage].seconds = time.perf_counter() - started
    if code != 0:
        killed = " (killed: -9, out of memory)" if "exited with -9" in last_lines(log) else ""
        return watcher.records, f"dvc repro failed at stage '{watcher.stage}' (exit {code}){killed}"
    return watcher.records, None


CONSTANT_PARTS = ("labeller",)     # a pseudo-label set's copy of its model: one per set, not per image


def lock_sizes(project: Path) -> dict[str, tuple[int, int]]:
    """(bytes of every stage's outputs from dvc.lock, the part of them that grows with the images:
    the files in sub-folders of an output folder other than a labeller copy)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    sizes = {}
    for name, stage in lock.get("stages", {}).items():
        total = sum(int(out.get("size", 0)) for out in stage.get("outs", []))
        per_image = 0
        for out in stage.get("outs", []):
            folder = project / out["path"]
            if folder.is_dir():
                per_image += sum(f.stat().st_size for sub in folder.iterdir() if sub.is_dir()
                                 and sub.name not in CONSTANT_PARTS for f in sub.rglob("*") if f.is_file())
        sizes[name] = (total, per_image)
    return sizes


# --- the table ----------------------------------------------------------------------------------------

def full_count(params: dict, dataset: str, split: str) -> int | None:
    """Images in ``split`` of the published dataset behind ``dataset`` (a stylized output: its source)."""
    spec = (params.get("datasets") or {}).get(dataset)
    if spec is None:
        source = (params.get("stylize") or {}).get("source") if dataset in ((params.get("stylize") or {}).get("outputs") or {}) \
            else (params.get("cyclegan") or {}).get("source")
        spec = (params.get("datasets") or {}).get(source)
    if spec is None:
        return None
    counts = FULL_COUNTS.get(spec["layout"], {})
    if spec["layout"] in ("acdc",) and spec.get("conditions"):
        return round(counts.get(split, 0) * len(spec["conditions"]) / 4) or None
    return counts.get(split) or counts.get("train" if split == "train" else "val")


def row_of(params: dict, name: str) -> dict:
    return {**(params.get("models") or {}), **(params.get("selftrained") or {})}[name]


def stage_row(stage: str, rec: StageRecord, sizes: tuple[int, int], full: dict, run: dict, written: dict, project: Path,
              iters: int) -> dict:
    """One stage: measured, then extrapolated to the published data and iteration counts (``full``:
    the preset's params before the bench's changes; ``run``: as run; ``written``: frames per dataset)."""
    kind, _, name = stage.partition("@")
    size, per_image_bytes = sizes
    row = {"stage": stage, "seconds": round(rec.seconds, 1), "peak_rss_mb": round(rec.peak_rss_mb),
           "peak_tree_mb": round(rec.peak_tree_mb), "out_bytes": size, "unit": None, "per_unit_s": None,
           "full_units": None, "full_cpu_h": None, "full_out_bytes": size}
    target, source = run.get("target"), run.get("source")

    def per_image(n_written: int) -> float:
        measured = seconds_per_item(rec.bars, n_written)
        return measured if measured is not None else rec.seconds / max(n_written, 1)

    def written_count(dataset: str, split: str) -> int:
        counts = written.get(dataset) or written.get((run.get("stylize") or {}).get("source")) \
            or written.get((run.get("cyclegan") or {}).get("source")) or {}
        return counts.get(split, 0)

    if kind in ("train", "selftrain"):
        recipe_name = row_of(full, name)["recipe"]
        recipe = merge(full["recipes"][recipe_name], row_of(full, name).get("overrides") or {})
        step = step_seconds(rec.bars, stage, iters)
        select = recipe.get("select") or {}
        sel_dataset = target if select.get("domain", "target") == "target" else source
        sel_split = select.get("split", "val")
        sel_written = written_count(sel_dataset, sel_split)
        sel_image = seconds_per_item([b for b in rec.bars if b.desc != stage], sel_written) if sel_written else None
        n_full = recipe["train"]["iters"]
        sel_images = select.get("images") or full_count(full, sel_dataset, sel_split) or 0
        selections = n_full // select["every"] if select.get("every") else 0
        # a batch capped by --max-batch: the published step taken as linear in the batch (compute-bound)
        ran = merge(run["recipes"][recipe_name], row_of(run, name).get("overrides") or {})
        published_batch, run_batch = (r.get("data", {}).get("batch_size") for r in (recipe, ran))
        batch_factor = published_batch / run_batch if published_batch and run_batch else 1.0
        first = first_iteration_seconds(rec.bars, stage, iters)
        one_off = max(first - step, 0.0) if first is not None and step is not None else 0.0
        row.update(unit="iteration", per_unit_s=step, full_units=n_full, select_per_image_s=sel_image,
                   select_images_written=sel_written, selections=selections, select_images=sel_images,
                   select_dataset=sel_dataset, batch=run_batch, batch_factor=batch_factor,
                   first_iteration_s=first, one_off_s=round(one_off, 1))
        if step is not None:   # the first iteration's excess (start-up, ISW's statistics) counted once
            hours = step * batch_factor * n_full + one_off + (selections * sel_images * (sel_image or 0.0))
            row["full_cpu_h"] = round(hours / 3600, 1)
    elif kind == "cyclegan_train":
        step = step_seconds(rec.bars, f"cyclegan_{name}", iters)
        n_full = full["cyclegan"]["train"]["iters"]
        row.update(unit="iteration", per_unit_s=step, full_units=n_full,
                   full_cpu_h=round(step * n_full / 3600, 1) if step else None)
    elif kind in ("pseudo_label", "evaluate", "prepare", "stylize", "translate"):
        if kind == "pseudo_label":
            dataset, split = target, "train"
        elif kind == "evaluate":
            dataset, split = name.rsplit("-", 1)[1], run["evaluate"].get("split", "val")
        elif kind == "prepare":
            dataset, split = name, None
        else:
            dataset, split = (run.get("cyclegan") or {}).get("source") if kind == "translate" \
                else (run.get("stylize") or {}).get("source"), "train"
        if split is None:
            n_written = sum((written.get(dataset) or {}).values())
            n_full = sum(full_count(full, dataset, s) or 0 for s in (written.get(dataset) or {}))
        else:
            n_written, n_full = written_count(dataset, split), full_count(full, dataset, split)
        if n_written:
            unit_s = per_image(n_written)
            row.update(unit="image", per_unit_s=round(unit_s, 2), full_units=n_full)
            if n_full:
                row["full_cpu_h"] = round(unit_s * n_full / 3600, 2)
                if kind != "evaluate":
                    row["full_out_bytes"] = round(size - per_image_bytes + per_image_bytes * n_full / n_written)
    return row


def gigabytes(n: float | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f}" if n < 1e11 else f"{n / 1e9:.0f}"


def summary_table(results: list[dict]) -> str:
    """One line per preset: how it ended, its training step, its peak memory and its extrapolation."""
    gpu = any("full_gpu_h" in res for res in results)
    lines = ["| preset | run here | training s/iteration (stage) | largest process, GB | full run: CPU h | outputs, GB |"
             + (" one GPU: h fp32 / bf16+cl |" if gpu else ""),
             "|---|---|---|---:|---:|---:|" + ("---:|" if gpu else "")]
    for res in results:
        steps = [r for r in res["stages"] if r["unit"] == "iteration" and r["per_unit_s"]]
        step = ", ".join(f"{r['per_unit_s']:.0f}" + (f" at batch {r['batch']}" if r.get("batch_factor", 1) != 1 else "")
                         + f" ({r['stage'].partition('@')[2]})" for r in steps) or "–"
        ended = ("completed" if res["completed"] else "killed (memory)" if "-9" in res.get("error", "") else "failed") \
            + f" in {res['seconds']:.0f} s" + (f", batch ≤ {res['max_batch']}" if res.get("max_batch") else "")
        peak = max((r["peak_rss_mb"] for r in res["stages"]), default=0) / 1024
        full = f"{res['full_cpu_h']:.0f} | {gigabytes(res['full_out_bytes'])}" if res["completed"] else "– | –"
        cell = f" {' / '.join(hours_text(h) for h in (res.get('full_gpu_h') or {None: None}).values())} |" if gpu else ""
        lines.append(f"| {res['preset']} | {ended} | {step} | {peak:.1f} | {full} |{cell}")
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    lines = [summary_table(results), ""]
    for res in results:
        head = f"### {res['preset']}: {'completed' if res['completed'] else 'FAILED: ' + res.get('error', '')}"
        capped = (f", training batches capped at {res['max_batch']} (the full run takes the published step as "
                  "linear in the batch)") if res.get("max_batch") else ""
        lines += [head, "", f"{res['seconds']:.0f} s on {res['cpus']} cores at scale {res['scale']}{capped}; "
                  f"extrapolated: {res['full_cpu_h']:.0f} CPU hours, {gigabytes(res['full_out_bytes'])} GB of outputs "
                  f"(as many again in the DVC cache).", "",
                  "| stage | s | per unit (s) | peak RSS MB (tree) | outputs MB | full: units | CPU h | GB |"
                  + (" GPU h fp32 / bf16+cl |" if "full_gpu_h" in res else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if "full_gpu_h" in res else "")]
        for row in res["stages"]:
            unit = "" if row["per_unit_s"] is None else f"{row['per_unit_s']:.3g} /{'img' if row['unit'] == 'image' else 'it'}"
            if (row.get("one_off_s") or 0) >= 30:
                unit += f" (+{row['one_off_s']:.0f} once)"
            lines.append(f"| {row['stage']} | {row['seconds']:.0f} | {unit} | {row['peak_rss_mb']} ({row['peak_tree_mb']}) "
                         f"| {row['out_bytes'] / 2**20:.1f} | {row['full_units'] or ''} | {row['full_cpu_h'] or ''} "
                         f"| {gigabytes(row['full_out_bytes'])} |" + (gpu_cell(row) if "full_gpu_h" in res else ""))
        lines.append("")
    return "\n".join(lines)


def hours_text(hours: float | None) -> str:
    return "–" if hours is None else f"{hours:.1f}"


def gpu_cell(row: dict) -> str:
    """A stage's GPU hours in each precision (bench/gpu.py --hours) as a table cell; empty for the host's stages."""
    hours = row.get("gpu_h") or {}
    if not hours or row["stage"].partition("@")[0] in HOST_STAGES:
        return " |"
    return " " + " / ".join("–" if h is None else f"{h:.2f}" for h in hours.values()) + " |"


def run_preset(preset: Path, workdir: Path, args) -> dict:
    project = workdir / preset.stem
    shutil.rmtree(project, ignore_errors=True)
    copy_project(project)
    params_file = project / "params.yaml"
    apply_preset([str(preset), "--params", str(params_file)])
    full = yaml.safe_load(params_file.read_text())
    overlay = project / "bench_overlay.yaml"
    overlay.write_text(yaml.safe_dump(bench_overlay(full, args.iters, args.scale, args.workers,
                                                    getattr(args, "max_batch", None))))
    apply_preset([str(overlay), "--params", str(params_file)])
    overlay.unlink()
    run = yaml.safe_load(params_file.read_text())
    rng = np.random.default_rng(0)
    written, roots = {}, {}
    for name, spec in run["datasets"].items():
        if spec["root"] not in roots:
            roots[spec["root"]] = write_dataset(spec, project / spec["root"], args.frames, args.scale, rng)
        written[name] = roots[spec["root"]]
    for spec in (run.get("weights") or {}).values():
        write_weights(spec, project / spec["file"])
    started = time.perf_counter()
    result = {"preset": preset.stem, "scale": args.scale, "iters": args.iters, "frames": written,
              "max_batch": getattr(args, "max_batch", None),
              "cpus": os.cpu_count(), "completed": False}
    with open(workdir / f"{preset.stem}.log", "w") as log:
        records, error = run_repro(project, log)
        result["completed"] = error is None
        if error:
            result["error"] = error
    result["seconds"] = time.perf_counter() - started
    return scored(result, records, full, run, project)


def scored(result: dict, records: dict[str, StageRecord], full: dict, run: dict, project: Path) -> dict:
    """``result`` with its per-stage rows, the selections' cost and the totals."""
    sizes = lock_sizes(project) if (project / "dvc.lock").is_file() else {}
    rows = [stage_row(s, r, sizes.get(s, (0, 0)), full, run, result["frames"], project, result["iters"])
            for s, r in records.items()]
    add_selection_cost(rows, run)
    result["stages"] = rows
    result["full_cpu_h"] = round(sum(r["full_cpu_h"] or 0 for r in rows), 1)
    result["full_out_bytes"] = sum(r["full_out_bytes"] or 0 for r in rows)
    result["project_bytes"] = sum(f.stat().st_size for f in project.rglob("*") if f.is_file() and not f.is_symlink())
    return result


def add_selection_cost(rows: list[dict], run: dict) -> None:
    """A training row whose selection showed no progress bar is charged its checkpoint selections
    at the per-image time of its model's evaluation on the same target."""
    per_image = {row["stage"]: row["per_unit_s"] for row in rows if row["stage"].startswith("evaluate@")}
    for row in rows:
        if row["unit"] != "iteration" or not row.get("selections") or row.get("select_per_image_s"):
            continue
        name = row["stage"].partition("@")[2]
        seconds = per_image.get(f"evaluate@{name}-{row['select_dataset']}")
        if seconds and row["full_cpu_h"] is not None:
            row["select_per_image_s"] = seconds
            row["full_cpu_h"] = round(row["full_cpu_h"] + row["selections"] * row["select_images"] * seconds / 3600, 1)


def records_from_log(log: Path, previous: list[dict]) -> dict[str, StageRecord]:
    """The stage records of an earlier run: the progress bars re-read from its log, the times and
    memory from its rows."""
    records: dict[str, StageRecord] = {}
    for row in previous:
        records[row["stage"]] = StageRecord(row["seconds"], row["peak_rss_mb"], row["peak_tree_mb"])
    stage = None
    for line in re.split(r"[\r\n]", log.read_text(errors="replace")):
        match = STAGE_LINE.search(line)
        if match:
            stage = match.group(1)
        elif stage in records and (bar := parse_bar(line)):
            records[stage].bars.append(bar)
    return records


def rescore(result: dict, workdir: Path) -> dict:
    """Recompute the rows of a kept run (its project and log in ``workdir``) with this file's rules."""
    project = workdir / result["preset"]
    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "params.yaml"
        shutil.copy(ROOT / "params.yaml", params_file)
        apply_preset([str(ROOT / "presets" / f"{result['preset']}.yaml"), "--params", str(params_file)])
        full = yaml.safe_load(params_file.read_text())
    run = yaml.safe_load((project / "params.yaml").read_text())
    records = records_from_log(workdir / f"{result['preset']}.log", result["stages"])
    return scored(result, records, full, run, project)


def published_presets() -> list[str]:
    """The presets of the published recipes: not ``synthetic_*``, and with rows to train (a base
    such as gta5_cityscapes_deeplabv2 holds only the shared setting)."""
    names = []
    for path in sorted((ROOT / "presets").glob("*.yaml")):
        layers = [layer for _, layer in preset_chain(path)]
        if not path.stem.startswith("synthetic") and any(layer.get("models") or layer.get("selftrained")
                                                         for layer in layers):
            names.append(path.stem)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="a preset's name (repeatable; default: the published ones)")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--frames", type=int, default=3, help="training frames per dataset")
    parser.add_argument("--iters", type=int, default=2, help="iterations per training stage (the first is not timed)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/segda-recipes"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "recipes.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cap of every loader's workers")
    parser.add_argument("--max-batch", type=int, help="cap of every training batch (for a step that does not fit)")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute the rows of --out from the runs kept in --workdir (no run)")
    parser.add_argument("--skip-done", action="store_true", help="skip the presets --out has completed at --scale")
    args = parser.parse_args(argv)
    names = args.preset or published_presets()
    args.workdir.mkdir(parents=True, exist_ok=True)
    # GPU hours (bench/gpu.py --hours) are of the rows they were computed on: rewritten rows drop them
    results = [without_gpu_hours(r) for r in json.loads(args.out.read_text())["presets"]] if args.out.is_file() else []
    if args.rescore:
        results = [rescore(r, args.workdir) for r in results]
        write_results(args.out, results)
        return 0
    done = {r["preset"] for r in results if r["completed"] and r["scale"] == args.scale}
    for name in names:
        if args.skip_done and name in done:
            continue
        print(f"== {name}", flush=True)
        res = run_preset(ROOT / "presets" / f"{name}.yaml", args.workdir, args)
        results = [r for r in results if r["preset"] != name] + [res]
        write_results(args.out, results)
        print(f"   {'completed' if res['completed'] else 'FAILED'} in {res['seconds']:.0f} s", flush=True)
    return 0 if all(r["completed"] for r in results) else 1


def without_gpu_hours(result: dict) -> dict:
    """A preset's result without bench/gpu.py --hours' fields (rerun --hours after a rerun)."""
    for key in ("full_gpu_h", "gpu_missing", "host_cpu_h"):
        result.pop(key, None)
    for row in result.get("stages", []):
        row.pop("gpu_h", None)
    return result


def write_results(out: Path, results: list[dict], cpu: str | None = None, extra: dict | None = None) -> None:
    """``cpu``: the machine the rows were measured on (default: this one); ``extra``: more top-level
    keys (bench/gpu.py's GPU hours name their GPU)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu or cpu_name(), **(extra or {}), "presets": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results) + "\n")


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = re.search(r"flags\s*:\s*(.*)", text)
    native_bf16 = bool(flags and ("avx512_bf16" in flags.group(1).split() or "amx_bf16" in flags.group(1).split()))
    return f"{model.group(1).strip() if model else 'unknown'}, {os.cpu_count()} cores, native bf16: {native_bf16}"


if __name__ == "__main__":
    sys.exit(main())
