"""Sweeps: train one config at every point of a grid over config keys, then compare.

A sweep file (see configs/sweep.yaml):

    base: configs/default.yaml          # the config every point starts from
    name: heads-x-dmodel                # runs go to runs/sweep-<name>/<point>/
    grid:                               # every combination of these values
      model.n_heads: [1, 2, 4, 8]
      model.d_model: [64, 128, 256]
    points:                             # optional single points besides the grid
      - {model.attention: additive}
    overrides: [train.max_minutes=4]    # the same budget for every point

Each point is an ordinary run. A finished point writes result.json and is skipped
when the sweep runs again; an interrupted one is resumed from its last.pt. At the
end the sweep writes results.md, results.csv and bleu-vs-parameters.png.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import shutil
import statistics
from dataclasses import dataclass

import yaml

from .checkpoint import model_from_checkpoint
from .config import ConfigError, _SafeNoAliasLoader, load_config, parse_override
from .train import resume, train
from .visualize import pyplot, read_metrics

log = logging.getLogger(__name__)

COLUMNS = ["parameters", "tokens_per_s", "valid_loss", "valid_bleu", "minutes", "steps"]


@dataclass
class Sweep:
    base: str
    name: str
    points: list[dict]  # each: {"section.key": value}
    overrides: list[str]
    keys: list[str]  # the keys that vary, in order
    folder: str  # <train.runs_dir>/sweep-<name>


def _point_name(point: dict) -> str:
    """{'model.n_heads': 4, 'model.d_model': 128} -> 'n_heads-4_d_model-128'."""
    return "_".join(f"{k.split('.', 1)[1]}-{v}" for k, v in point.items()) or "base"


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file; every point's config is validated before any training."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_SafeNoAliasLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"{path}: sweep file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or "base" not in raw:
        raise ConfigError(f"{path}: expected a mapping with base, grid and/or points")
    unknown = set(raw) - {"base", "name", "grid", "points", "overrides"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected "
                          "base, name, grid, points, overrides")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: grid: expected section.key: [value, ...] lines")
    extra = raw.get("points") or []
    if not isinstance(extra, list) or not all(isinstance(p, dict) for p in extra):
        raise ConfigError(f"{path}: points: expected a list of {{section.key: value}} mappings")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: overrides: expected a list of section.key=value strings")
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    points += [dict(p) for p in extra]
    if not points:
        raise ConfigError(f"{path}: no points: give a grid or points")
    keys = list(dict.fromkeys(k for p in points for k in p))
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    runs_dir = load_config(str(raw["base"]), overrides).train.runs_dir
    sweep = Sweep(str(raw["base"]), name, points, overrides, keys,
                  os.path.join(runs_dir, f"sweep-{name}"))
    for point in points:  # fail now, not after an hour of training
        for key in point:
            parse_override(f"{key}=0")
        load_config(sweep.base, _overrides(sweep, point))
    return sweep


def _overrides(sweep: Sweep, point: dict) -> list[str]:
    return [*sweep.overrides, *(f"{k}={json.dumps(v)}" for k, v in point.items()),
            f"train.runs_dir={sweep.folder}", f"train.name={_point_name(point)}"]


def run_point(sweep: Sweep, point: dict) -> dict:
    """Train (or resume, or skip) one point; returns its row of the results table."""
    run_dir = os.path.join(sweep.folder, _point_name(point))
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    if os.path.exists(os.path.join(run_dir, "last.pt")):
        log.info("sweep %s: resuming %s", sweep.name, run_dir)
        resume(run_dir)
    else:
        log.info("sweep %s: training %s", sweep.name, run_dir)
        cfg = load_config(sweep.base, _overrides(sweep, point))
        if os.path.isdir(run_dir):  # an attempt killed before its first checkpoint
            log.info("sweep %s: %s has no checkpoint; starting it again", sweep.name, run_dir)
            shutil.rmtree(run_dir)
        train(cfg)
    row = summarize(run_dir, point)
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, result_path)
    return row


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


def write_results(sweep: Sweep, rows: list[dict]) -> list[str]:
    """results.csv, results.md and bleu-vs-parameters.png in the sweep's folder."""
    header = [*sweep.keys, *COLUMNS]
    csv_path = os.path.join(sweep.folder, "results.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    titles = {"parameters": "parameters", "tokens_per_s": "tokens/s",
              "valid_loss": "valid loss", "valid_bleu": "valid BLEU", "minutes": "minutes",
              "steps": "steps"}
    md_path = os.path.join(sweep.folder, "results.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("| " + " | ".join(k.split(".", 1)[1] for k in sweep.keys) + " | "
                + " | ".join(titles[c] for c in COLUMNS) + " |\n")
        f.write("|" + "---|" * len(header) + "\n")
        for row in rows:
            cells = [str(row.get(k, "")) for k in sweep.keys]
            cells += [f"{row['parameters']:,}", f"{row['tokens_per_s']:,}",
                      f"{row['valid_loss']:.3f}", f"{row['valid_bleu']:.2f}",
                      f"{row['minutes']:.1f}", str(row["steps"])]
            f.write("| " + " | ".join(cells) + " |\n")
    return [md_path, csv_path, plot_sweep(sweep, rows)]


def plot_sweep(sweep: Sweep, rows: list[dict], line_key: str = "model.n_heads") -> str:
    """Validation BLEU against parameters: one line per value of line_key on the grid;
    points that differ in other ways (say, the additive score) as separate markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    others = [k for k in sweep.keys if k not in (line_key, "model.d_model")]
    on_grid = [r for r in rows if not any(k in r for k in others)]
    for value in sorted({r.get(line_key) for r in on_grid if line_key in r}):
        line = sorted((r for r in on_grid if r.get(line_key) == value),
                      key=lambda r: r["parameters"])
        ax.plot([r["parameters"] for r in line], [r["valid_bleu"] for r in line], marker="o",
                label=f"{line_key.split('.', 1)[1]} = {value}")
    for r in rows:
        if r not in on_grid:
            label = ", ".join(f"{k.split('.', 1)[1]} = {r[k]}" for k in sweep.keys if k in r)
            ax.plot([r["parameters"]], [r["valid_bleu"]], marker="*", markersize=12,
                    linestyle="none", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation BLEU (greedy)")
    budget = [o for o in sweep.overrides if o.split("=")[0] in ("train.max_minutes",
                                                                 "train.max_steps")]
    ax.set_title(f"sweep {sweep.name} ({', '.join(budget) or 'the base budget'})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = os.path.join(sweep.folder, "bleu-vs-parameters.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_sweep(path: str) -> list[str]:
    """Every point of the sweep file at path, then the table and the plot."""
    sweep = load_sweep(path)
    os.makedirs(sweep.folder, exist_ok=True)
    rows = []
    for i, point in enumerate(sweep.points, start=1):
        log.info("sweep %s: point %d of %d: %s", sweep.name, i, len(sweep.points),
                 _point_name(point))
        rows.append(run_point(sweep, point))
    return write_results(sweep, rows)
