"""Sweeps: train one config at every point of a grid over config keys, then compare.

A sweep file (see configs/sweep.yaml):

    base: configs/default.yaml          # the config every point starts from
    name: heads-x-dmodel                # runs go to runs/sweep-<name>/<point>/
    grid:                               # every combination of these values
      model.n_heads: [1, 2, 4, 8]
      model.d_model: [64, 128, 256]
    points:                             # optional single points besides the grid
      - {model.attention: additive}
    overrides: [train.max_steps=800]    # the same budget for every point
    seeds: [1, 2, 3]                    # optional: train every point once per seed

Without a grid, the base config itself is the first point (named base), then the points.

Each point is an ordinary run (one per seed). A finished point writes result.json and is skipped
when the sweep runs again; an interrupted one is resumed from its last.pt. At the
end the sweep writes results.md, results.csv and scores-vs-parameters.png; with seeds,
results.md gives each point's mean and spread over them, and the plot each point's
validation loss and BLEU as the mean with a bar from the lowest seed to the highest, so
that a difference can be told from the noise of one seed.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from .checkpoint import model_from_checkpoint
from .config import ConfigError, load_config, parse_override, read_yaml
from .runs import Interrupted, RunError
from .train import resume, train
from .visualize import pyplot, read_metrics

log = logging.getLogger(__name__)

PLOT = "scores-vs-parameters.png"  # validation loss and BLEU of every point
COLUMNS = ["parameters", "tokens_per_s", "valid_loss", "valid_bleu", "minutes", "steps"]


@dataclass
class Sweep:
    base: str
    name: str
    points: list[dict]  # each: {"section.key": value}
    overrides: list[str]
    keys: list[str]  # the keys that vary, in order
    folder: str  # <train.runs_dir>/sweep-<name>
    seeds: list[int] | None = None  # train.seed of each run of a point; None: the base's

    def runs(self) -> list[tuple[dict, int | None]]:
        """(point, seed) of every run, point by point."""
        return [(point, seed) for point in self.points for seed in (self.seeds or [None])]


def _point_name(point: dict, seed: int | None = None) -> str:
    """{'model.n_heads': 4, 'model.d_model': 128}, 2 -> 'n_heads-4_d_model-128_seed-2'."""
    name = "_".join(f"{k.split('.', 1)[1]}-{v}" for k, v in point.items()) or "base"
    return name if seed is None else f"{name}_seed-{seed}"


def load_sweep(path: str, extra_overrides: list[str] = ()) -> Sweep:
    """Read and check a sweep file; every point's config is validated before any training.
    extra_overrides (`make sweep ARGS=...`) come after the file's own: data.path=..., say."""
    raw = read_yaml(path, "sweep file")
    if not isinstance(raw, dict) or "base" not in raw:
        raise ConfigError(f"{path}: expected a mapping with base, grid and/or points")
    unknown = set(raw) - {"base", "name", "grid", "points", "overrides", "seeds"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected "
                          "base, name, grid, points, overrides, seeds")
    seeds = raw.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(
            isinstance(x, int) and not isinstance(x, bool) for x in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ConfigError(f"{path}: seeds: expected a list of different integers, e.g. [1, 2, 3]")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: grid: expected section.key: [value, ...] lines")
    extra = raw.get("points") or []
    if not isinstance(extra, list) or not all(isinstance(p, dict) for p in extra):
        raise ConfigError(f"{path}: points: expected a list of {{section.key: value}} mappings")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: overrides: expected a list of section.key=value strings")
    overrides = [*overrides, *extra_overrides]
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    points += [dict(p) for p in extra]
    names = [_point_name(p) for p in points]  # each point's run folder
    same = sorted({n for n in names if names.count(n) > 1})
    if same:  # two points would train into one folder
        raise ConfigError(f"{path}: point(s) {', '.join(same)} given twice (without a grid, "
                          "the base config is already the first point, named base)")
    keys = list(dict.fromkeys(k for p in points for k in p))
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    runs_dir = load_config(str(raw["base"]), overrides).train.runs_dir
    sweep = Sweep(str(raw["base"]), name, points, overrides, keys,
                  os.path.join(runs_dir, f"sweep-{name}"), seeds)
    for point, seed in sweep.runs():  # fail now, not after an hour of training
        for key in point:
            parse_override(f"{key}=0")
        load_config(sweep.base, _overrides(sweep, point, seed))
    return sweep


def _overrides(sweep: Sweep, point: dict, seed: int | None = None) -> list[str]:
    return [*sweep.overrides, *(f"{k}={json.dumps(v)}" for k, v in point.items()),
            *([] if seed is None else [f"train.seed={seed}"]),
            f"train.runs_dir={sweep.folder}", f"train.name={_point_name(point, seed)}"]


def run_point(sweep: Sweep, point: dict, seed: int | None = None) -> dict:
    """Train (or resume, or skip) one run of a point; returns its row of the results."""
    run_dir = _run_dir(sweep, point, seed)
    if os.path.exists(os.path.join(run_dir, "result.json")):
        return _result(sweep, point, seed)
    if os.path.exists(os.path.join(run_dir, "last.pt")):
        log.info("sweep %s: resuming %s", sweep.name, run_dir)
        resume(run_dir)
    else:
        log.info("sweep %s: training %s", sweep.name, run_dir)
        _clear_killed_start(sweep, run_dir)
        train(load_config(sweep.base, _overrides(sweep, point, seed)))
    return _result(sweep, point, seed)


def _run_dir(sweep: Sweep, point: dict, seed: int | None) -> str:
    return os.path.join(sweep.folder, _point_name(point, seed))


def _clear_killed_start(sweep: Sweep, run_dir: str) -> None:
    """Remove an attempt killed before its first checkpoint: the run starts again."""
    if os.path.isdir(run_dir):
        log.info("sweep %s: %s has no checkpoint; starting it again", sweep.name, run_dir)
        shutil.rmtree(run_dir)


def _result(sweep: Sweep, point: dict, seed: int | None) -> dict:
    """A trained run's row, from its result.json, written on first asking."""
    run_dir = _run_dir(sweep, point, seed)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    row = summarize(run_dir, point)
    if seed is not None:
        row["seed"] = seed
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, result_path)
    return row


def train_apart(sweep: Sweep, jobs: int) -> None:
    """Train the sweep's unfinished runs jobs at a time, each in a process of its own
    (`make sweep JOBS=N`): on a GPU a small model's step is bound by the host, so that N
    runs side by side take little longer than one. Each run's log lines go to
    <sweep folder>/<run>.log. A run that fails lets the others finish, then stops the
    sweep; Ctrl-C stops them all, each saving its last.pt (the same command resumes)."""
    todo = [(p, s) for p, s in sweep.runs()
            if not os.path.exists(os.path.join(_run_dir(sweep, p, s), "result.json"))]
    running: dict[subprocess.Popen, str] = {}
    failed = []
    try:
        while todo or running:
            while todo and len(running) < jobs and not failed:
                point, seed = todo.pop(0)
                name, run_dir = _point_name(point, seed), _run_dir(sweep, point, seed)
                command = [sys.executable, "-m", "transformer.cli"]  # transformer-train
                if os.path.exists(os.path.join(run_dir, "last.pt")):
                    command += ["--resume", run_dir]
                else:
                    _clear_killed_start(sweep, run_dir)
                    command += ["--config", sweep.base, *_overrides(sweep, point, seed)]
                log_path = os.path.join(sweep.folder, f"{name}.log")
                with open(log_path, "a", encoding="utf-8") as out:
                    running[subprocess.Popen(command, stdout=out, stderr=out)] = name
                log.info("sweep %s: training %s (%d at a time; its log: %s)", sweep.name, name,
                         jobs, log_path)
            if failed and not running:
                break
            time.sleep(0.5)
            for process in [p for p in running if p.poll() is not None]:
                name = running.pop(process)
                if process.returncode:
                    failed.append(f"{name} (exit {process.returncode}; see "
                                  f"{os.path.join(sweep.folder, name)}.log)")
                else:
                    log.info("sweep %s: %s finished", sweep.name, name)
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached them too; kill and hangup not
        for process in running:
            process.send_signal(signal.SIGINT)
        for process in running:
            process.wait()
        raise
    if failed:
        raise RunError(f"sweep {sweep.name}: {len(failed)} run(s) failed: {', '.join(failed)}")


def summarize(run_dir: str, point: dict) -> dict:
    """A finished run's row: its size, speed and final validation scores."""
    model, *_ = model_from_checkpoint(os.path.join(run_dir, "last.pt"))
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = [r for r in records if "valid_bleu" in r and "average_of" not in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    last = evals[-1]
    return {**point, "parameters": model.num_parameters(),
            "tokens_per_s": round(statistics.median(speeds)) if speeds else 0,
            "valid_loss": last["valid_loss"], "valid_bleu": last["valid_bleu"],
            "minutes": last["minutes"], "steps": last["step"]}


def mean_row(runs: list[dict]) -> dict:
    """One point's runs (one per seed) as one row: means, and the spread of the scores."""
    row = dict(runs[0])
    row.pop("seed", None)
    for key in ("valid_loss", "valid_bleu", "minutes", "steps"):
        values = [r[key] for r in runs]
        row[key] = statistics.fmean(values)
        row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
    row["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in runs))
    row["seeds"] = len(runs)
    return row


def write_results(sweep: Sweep, groups: list[list[dict]]) -> list[str]:
    """results.csv (every run), results.md (a row per point: with seeds, the mean and
    spread over them) and scores-vs-parameters.png in the sweep's folder."""
    header = [*sweep.keys, *(["seed"] if sweep.seeds else []), *COLUMNS]
    csv_path = os.path.join(sweep.folder, "results.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(r for runs in groups for r in runs)
    rows = [mean_row(runs) for runs in groups]
    titles = ["parameters", "tokens/s", "valid loss", "valid BLEU", "minutes", "steps"]
    if sweep.seeds:
        titles[2:4] = ["valid loss (mean ± sd)", "valid BLEU (mean ± sd)", "BLEU min-max"]
    md_path = os.path.join(sweep.folder, "results.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("| " + " | ".join([*(k.split(".", 1)[1] for k in sweep.keys), *titles]) + " |\n")
        f.write("|" + "---|" * (len(sweep.keys) + len(titles)) + "\n")
        for row in rows:
            cells = [str(row.get(k, "")) for k in sweep.keys]
            cells += [f"{row['parameters']:,}", f"{row['tokens_per_s']:,}"]
            if sweep.seeds:
                cells += [f"{row['valid_loss']:.3f} ± {row['valid_loss_sd']:.3f}",
                          f"{row['valid_bleu']:.2f} ± {row['valid_bleu_sd']:.2f}",
                          f"{row['valid_bleu_min']:.2f}-{row['valid_bleu_max']:.2f}"]
            else:
                cells += [f"{row['valid_loss']:.3f}", f"{row['valid_bleu']:.2f}"]
            cells += [f"{row['minutes']:.1f}", f"{row['steps']:.0f}"]
            f.write("| " + " | ".join(cells) + " |\n")
    return [md_path, csv_path, plot_sweep(sweep, rows)]


def plot_sweep(sweep: Sweep, rows: list[dict], line_key: str = "model.n_heads") -> str:
    """Validation loss and BLEU against parameters, side by side: one line per value of
    line_key on the grid; points that differ in other ways (say, the additive score) as
    separate markers. With seeds, each point is their mean, its bar from the lowest seed
    to the highest. Heads split d_model, so the lines share their x: each line is moved a
    little sideways to keep every bar in sight."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    others = [k for k in sweep.keys if k not in (line_key, "model.d_model")]
    on_grid = [r for r in rows if not any(k in r for k in others)]
    values = sorted({r.get(line_key) for r in on_grid if line_key in r})

    def draw(line: list[dict], shift: float = 1.0, **style) -> None:
        x = [r["parameters"] * shift for r in line]
        for ax, key in zip(axes, ("valid_loss", "valid_bleu")):
            y = [r[key] for r in line]
            if sweep.seeds:
                spread = [[r[key] - r[f"{key}_min"] for r in line],
                          [r[f"{key}_max"] - r[key] for r in line]]
                ax.errorbar(x, y, yerr=spread, capsize=3, **style)
            else:
                ax.plot(x, y, **style)

    for i, value in enumerate(values):
        line = sorted((r for r in on_grid if r.get(line_key) == value),
                      key=lambda r: r["parameters"])
        draw(line, shift=1.05 ** (i - (len(values) - 1) / 2), marker="o",
             label=f"{line_key.split('.', 1)[1]} = {value}")
    for r in rows:
        if r not in on_grid or line_key not in r:  # the base config alone: a seeds-only sweep
            label = ", ".join(f"{k.split('.', 1)[1]} = {r[k]}" for k in sweep.keys
                              if k in r) or os.path.basename(sweep.base)
            draw([r], marker="*", markersize=12, linestyle="none", label=label)
    spread = ", mean and range over seeds" if sweep.seeds else ""
    sizes = {r["parameters"]: r.get("model.d_model") for r in on_grid}  # ticks: each size
    for ax, what in zip(axes, ("validation loss", "validation BLEU (greedy)")):
        ax.set_xscale("log")
        ax.set_xticks(list(sizes), [f"{n / 1e6:.2f} M" + ("" if d is None else f"\nd_model {d}")
                                    for n, d in sizes.items()])
        ax.minorticks_off()
        ax.set_xlabel("parameters")
        ax.set_ylabel(what + spread, fontsize=9)
        ax.grid(alpha=0.3)
    budget = [o for o in sweep.overrides if o.split("=")[0] in ("train.max_minutes",
                                                                 "train.max_steps")]
    seeds = f", seeds {', '.join(map(str, sweep.seeds))}" if sweep.seeds else ""
    fig.suptitle(f"sweep {sweep.name} ({', '.join(budget) or 'the base budget'}{seeds})",
                 fontsize=10)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = os.path.join(sweep.folder, PLOT)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_sweep(path: str, overrides: list[str] = (), jobs: int = 1) -> list[str]:
    """Every run of the sweep file at path (each point, once per seed), then the table
    and the plot; jobs > 1 trains that many runs at a time (train_apart)."""
    sweep = load_sweep(path, overrides)
    os.makedirs(sweep.folder, exist_ok=True)
    try:
        if jobs > 1:
            train_apart(sweep, jobs)
        total, groups = len(sweep.runs()), []
        for point in sweep.points:
            groups.append([])  # the point's runs, one per seed
            for seed in sweep.seeds or [None]:
                if jobs <= 1:
                    log.info("sweep %s: run %d of %d: %s", sweep.name,
                             sum(map(len, groups)) + 1, total, _point_name(point, seed))
                groups[-1].append(_result(sweep, point, seed) if jobs > 1  # trained above
                                  else run_point(sweep, point, seed))
    except (Interrupted, KeyboardInterrupt):
        # Not the run's own `make train RESUME=`: that finishes one run and leaves the
        # sweep's other runs and its table undone. The sweep's command does all of it.
        again = " ".join([f"make sweep SWEEP={path}",
                          *([f'ARGS="{" ".join(overrides)}"'] if overrides else []),
                          *([f"JOBS={jobs}"] if jobs > 1 else [])])
        raise Interrupted(f"sweep {sweep.name} interrupted: each unfinished run saved its "
                          f"last.pt; `{again}` goes on from there (finished runs are "
                          "kept)") from None
    return write_results(sweep, groups)
