"""Attention maps, training curves and sweeps: the weights are right and the commands work."""

import csv
import json
import math
import os
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT, TINY_CONFIG, tiny_model
from transformer.config import load_config
from transformer.train import train
from transformer.visualize import attention_weights

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(*args, **kw):
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.mark.parametrize("score", ["scaled_dot", "additive"])
def test_attention_weights_are_distributions_that_respect_the_masks(score):
    model = tiny_model(attention=score)
    src = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0]])  # the second source is padded
    tgt = torch.tensor([[2, 11, 12, 13], [2, 14, 15, 16]])
    w = attention_weights(model, src, tgt)
    assert [len(w[k]) for k in ("encoder-self", "decoder-self", "encoder-decoder")] == [2, 2, 2]
    for kind, (rows, cols) in {"encoder-self": (5, 5), "decoder-self": (4, 4),
                               "encoder-decoder": (4, 5)}.items():
        for layer in w[kind]:
            assert layer.shape == (2, 4, rows, cols)
            assert torch.allclose(layer.sum(-1), torch.ones(2, 4, rows), atol=1e-5)
            if kind != "decoder-self":  # padded source positions get no weight
                assert (layer[1, :, :, 3:] == 0).all()
    for layer in w["decoder-self"]:  # position i sees 0..i only
        assert torch.equal(layer, layer.tril())
    # The fast path is back on afterwards.
    assert not any(m.use_reference for m in model.attention_modules())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = load_config(TINY_CONFIG, [f"train.runs_dir={tmp}/runs", "train.name=tiny",
                                    f"data.data_dir={tmp}/data", "train.max_steps=30",
                                    "train.eval_every=10", "train.log_every=5",
                                    "train.device=cpu"])
    return train(cfg)


@needs_make
def test_make_attention_writes_a_figure_per_attention_and_layer(tiny_run, tmp_path):
    out = tmp_path / "maps"
    r = subprocess.run([os.path.join(ROOT, ".venv", "bin", "transformer-attention"),
                        "--ckpt", f"{tiny_run}/last.pt", "--out", str(out), "one two three"],
                       capture_output=True, text=True)
    if r.returncode == 127:
        pytest.skip("no .venv")
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(out))
    assert names == sorted([f"{k}-layer{n}.png" for k in ("encoder-self", "decoder-self",
                                                          "encoder-decoder") for n in (1, 2)]
                           + ["index.html"])
    assert all((out / n).read_bytes().startswith(b"\x89PNG") for n in names if n.endswith("png"))
    assert "encoder-decoder-layer2.png" in (out / "index.html").read_text()
    assert f"index: {out}/index.html" in r.stdout

    r = _make("attention", f"CKPT={tiny_run}/last.pt", "SENTENCE=it's \"quoted\"")
    assert r.returncode == 0, r.stderr
    assert os.path.isdir(os.path.join(tiny_run, "attention", "it-s-quoted"))
    r = _make("attention", f"CKPT={tiny_run}/last.pt", "SENTENCE=")
    assert r.returncode != 0 and "error: the sentence is empty" in r.stderr


@needs_make
def test_make_plot_draws_the_training_curves(tiny_run):
    r = _make("plot", f"RUN={tiny_run}")
    assert r.returncode == 0, r.stderr
    for name in ("loss.png", "bleu.png", "lr.png", "stability.png"):
        assert (open(os.path.join(tiny_run, name), "rb").read(4) == b"\x89PNG"), name
    with open(os.path.join(tiny_run, "metrics.jsonl")) as f:  # what stability.png draws
        gnorms = [r["gnorm"] for r in map(json.loads, f) if "loss" in r]
    assert gnorms and all(g > 0 and math.isfinite(g) for g in gnorms)
    r = _make("plot", "RUN=/no/such/run")
    assert r.returncode != 0 and "error: /no/such/run: no metrics.jsonl" in r.stderr


@needs_make
def test_make_plot_of_several_runs_draws_them_side_by_side(tiny_run, tmp_path):
    seeds = tmp_path / "sweep"  # a sweep's folder: runs, and results files beside them
    for name in ("seed-1", "seed-2"):
        shutil.copytree(tiny_run, seeds / name)
    (seeds / "results.md").write_text("a table")
    before = sorted(os.listdir(seeds / "seed-1"))
    for run in (f"{seeds}/seed-1 {seeds}/seed-2", str(seeds), f"{seeds}/*"):
        if (seeds / "compare.png").exists():
            os.remove(seeds / "compare.png")
        r = _make("plot", f"RUN={run}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(seeds / "compare.png")], run
        assert open(seeds / "compare.png", "rb").read(4) == b"\x89PNG"
    r = _make("plot", f"RUN={seeds}", "X=epochs")
    assert r.returncode == 0 and r.stdout.split() == [str(seeds / "compare.png")], r.stderr
    assert sorted(os.listdir(seeds / "seed-1")) == before  # one figure for all, not one each
    r = _make("plot", f"RUN={seeds}/seed-1 {seeds}/missing")
    assert r.returncode != 0 and f"error: {seeds}/missing: no metrics.jsonl" in r.stderr


def test_several_runs_are_drawn_one_line_each(tiny_run, tmp_path, monkeypatch):
    import matplotlib.figure

    from transformer.visualize import plot_runs, pyplot

    pyplot()
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    drawn = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: drawn.update(
        {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in fig.axes}))
    plot_runs([tiny_run, str(other)], str(tmp_path))
    assert drawn == {title: ["tiny", "other"] for title in (
        "validation loss", "validation BLEU (greedy)", "gradient norm (before clipping)")}


def test_runs_of_different_update_sizes_compare_against_epochs(tmp_path, monkeypatch):
    import matplotlib.figure

    from transformer.visualize import epochs_at, plot_runs, pyplot, read_metrics

    runs = [train(load_config(TINY_CONFIG, [
        f"train.runs_dir={tmp_path}/runs", f"train.name=b{tokens}",
        f"data.data_dir={tmp_path}/data", f"train.batch_tokens={tokens}", "train.max_steps=20",
        "train.log_every=1", "train.eval_every=1000", "train.keep_checkpoints=0",
        "train.device=cpu"]))
        for tokens in (2048, 4096)]
    trained = {}
    for run in runs:
        records = [r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if "loss" in r]
        epochs = [r["epochs"] for r in records]
        assert all(r["epoch"] - 1 < r["epochs"] <= r["epoch"] for r in records)
        assert epochs == sorted(set(epochs)) and epochs[-1] > 1  # rising, past an epoch
        # Runs logged before "epochs" was: worked out from the epoch in progress.
        older = [{k: v for k, v in r.items() if k != "epochs"} for r in records]
        assert epochs_at(older) == pytest.approx({r["step"]: r["epochs"] for r in records},
                                                 abs=1e-3)
        trained[run] = epochs
    # Twice the tokens an update, about twice the epochs in as many updates.
    assert 1.7 < trained[runs[1]][-1] / trained[runs[0]][-1] < 2.3

    pyplot()
    drawn = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: drawn.update(
        {ax.get_title(): ([list(line.get_xdata()) for line in ax.get_lines()], ax.get_xlabel())
         for ax in fig.axes}))
    plot_runs(runs, str(tmp_path), x="epochs")
    xs, label = drawn["gradient norm (before clipping)"]
    assert xs == [trained[run] for run in runs] and label.startswith("epochs")


def _sweep_file(tmp_path, name: str, extra: str, budget: str):
    """A sweep of the tiny config over 1 and 2 heads, in tmp_path."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
base: {TINY_CONFIG}
name: {name}
grid:
  model.n_heads: [1, 2]
{extra}
overrides: [{budget}, train.eval_every=1000, train.device=cpu, train.runs_dir={tmp_path}/runs,
            data.data_dir={tmp_path}/data, train.keep_checkpoints=0]
""")
    return sweep


def test_sweep_trains_every_point_tabulates_and_resumes(tmp_path):
    from transformer.sweep import run_sweep

    sweep = _sweep_file(tmp_path, "t", "points:\n  - {model.attention: additive}",
                        "train.max_steps=4, train.log_every=2")
    paths = run_sweep(str(sweep))
    folder = tmp_path / "runs" / "sweep-t"
    assert [os.path.basename(p) for p in paths] == ["results.md", "results.csv",
                                                     "scores-vs-parameters.png"]
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert [(r["model.n_heads"], r["model.attention"]) for r in rows] == [
        ("1", ""), ("2", ""), ("", "additive")]
    assert all(r["steps"] == "4" and float(r["tokens_per_s"]) > 0 for r in rows)
    assert rows[0]["parameters"] == rows[1]["parameters"]  # heads split d_model: same size
    assert int(rows[2]["parameters"]) > int(rows[0]["parameters"])  # the v vectors
    assert (folder / "results.md").read_text().count("\n") == 2 + 3

    # Run again: finished points are kept; a point without result.json resumes, not restarts.
    done = folder / "n_heads-1" / "result.json"
    stamp = done.stat().st_mtime_ns
    os.unlink(folder / "n_heads-2" / "result.json")
    run_sweep(str(sweep))
    assert done.stat().st_mtime_ns == stamp
    assert (folder / "n_heads-2" / "result.json").exists()
    log = (folder / "n_heads-2" / "metrics.jsonl").read_text()
    assert log.count('"valid_loss"') == 1  # not trained a second time


def test_an_interrupted_sweep_says_the_sweep_command_goes_on(tmp_path, monkeypatch):
    import transformer.sweep as sweep_module
    from transformer.runs import Interrupted

    sweep = _sweep_file(tmp_path, "i", "", "train.max_steps=4")
    real_train, started = sweep_module.train, []

    def train_then_ctrl_c(cfg):  # the second run is stopped as Ctrl-C stops a run
        started.append(cfg.model.n_heads)
        if len(started) == 2:
            raise Interrupted("interrupted at step 2: saved last.pt; resume with "
                              "`make train RESUME=...`")
        return real_train(cfg)

    monkeypatch.setattr(sweep_module, "train", train_then_ctrl_c)
    with pytest.raises(Interrupted) as stopped:
        sweep_module.run_sweep(str(sweep), ["train.log_every=2"])
    message = str(stopped.value)
    assert f'`make sweep SWEEP={sweep} ARGS="train.log_every=2"` goes on' in message
    assert "make train RESUME" not in message  # one run's resume would leave the table undone
    assert started == [1, 2]
    assert not (tmp_path / "runs" / "sweep-i" / "results.md").exists()


def test_sweep_with_seeds_reports_mean_and_spread(tmp_path):
    from transformer.sweep import run_sweep

    sweep = _sweep_file(tmp_path, "s", "seeds: [1, 2, 3]",
                        "train.max_steps=30, train.log_every=10, model.dropout=0.1")
    run_sweep(str(sweep))
    folder = tmp_path / "runs" / "sweep-s"
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert [(r["model.n_heads"], r["seed"]) for r in rows] == [
        (h, s) for h in ("1", "2") for s in ("1", "2", "3")]
    for r in rows:  # each run trained with its own seed, into its own folder
        name = f"n_heads-{r['model.n_heads']}_seed-{r['seed']}"
        assert load_config(str(folder / name / "config.yaml")).train.seed == int(r["seed"])
    losses = [float(r["valid_loss"]) for r in rows[:3]]
    assert len(set(losses)) == 3  # the seeds made different runs
    table = (folder / "results.md").read_text().splitlines()
    assert len(table) == 2 + 2 and "mean ± sd" in table[0]
    mean, sd = (sum(losses) / 3, (sum((x - sum(losses) / 3) ** 2 for x in losses) / 2) ** 0.5)
    assert f"{mean:.3f} ± {sd:.3f}" in table[2]
    bleus = [float(r["valid_bleu"]) for r in rows[:3]]
    assert f"{min(bleus):.2f}-{max(bleus):.2f}" in table[2]


def test_a_sweep_of_seeds_alone_trains_the_base_config_once_per_seed(tmp_path):
    from transformer.sweep import run_sweep

    sweep = tmp_path / "seeds.yaml"  # no grid: the recipe itself, is it good for every seed?
    sweep.write_text(f"""
base: {TINY_CONFIG}
seeds: [1, 2]
overrides: [train.max_steps=6, train.eval_every=1000, train.device=cpu,
            train.runs_dir={tmp_path}/runs, data.data_dir={tmp_path}/data]
""")
    run_sweep(str(sweep), ["train.max_steps=3"])  # make sweep ARGS=...: after the file's own
    folder = tmp_path / "runs" / "sweep-seeds"
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert [(r["seed"], r["steps"]) for r in rows] == [("1", "3"), ("2", "3")]
    assert (folder / "base_seed-2" / "last.pt").exists()
    assert (folder / "results.md").read_text().count("\n") == 2 + 1  # one point
    assert (folder / "scores-vs-parameters.png").stat().st_size > 0


def test_a_sweep_trains_runs_side_by_side_with_the_same_results(tmp_path):
    from transformer.runs import RunError
    from transformer.sweep import run_sweep

    def sweep(name: str) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"""
base: {TINY_CONFIG}
name: {name}
grid: {{model.n_heads: [1, 2]}}
seeds: [1, 2]
overrides: [train.max_steps=6, train.eval_every=3, train.log_every=3, train.device=cpu,
            train.threads=1, train.runs_dir={tmp_path}/runs, data.data_dir={tmp_path}/data]
""")
        return str(path)

    run_sweep(sweep("one"))  # one run after another, in this process
    run_sweep(sweep("apart"), jobs=3)  # three at a time, each in a process of its own
    folder = tmp_path / "runs"
    one, apart = (list(csv.DictReader(open(folder / f"sweep-{n}" / "results.csv")))
                  for n in ("one", "apart"))
    keys = ("model.n_heads", "seed", "steps", "valid_loss", "valid_bleu", "parameters")
    assert [[r[k] for k in keys] for r in apart] == [[r[k] for k in keys] for r in one]
    assert len({r["valid_loss"] for r in apart}) == 4  # four different runs
    log = (folder / "sweep-apart" / "n_heads-2_seed-1.log").read_text()
    assert "eval step 6" in log and "stopped by train.max_steps=6" in log
    for run in ("n_heads-1_seed-1", "n_heads-2_seed-2"):  # each run finished once, not again
        metrics = (folder / "sweep-apart" / run / "metrics.jsonl").read_text()
        assert metrics.count('"average_of"') == 1 and metrics.count('"valid_loss"') == 2, run

    broken = folder / "sweep-apart" / "n_heads-1_seed-2"  # a run that cannot resume
    os.remove(broken / "result.json")
    (broken / "last.pt").write_text("not a checkpoint")
    with pytest.raises(RunError, match=r"1 run\(s\) failed: n_heads-1_seed-2 \(exit 2; see "):
        run_sweep(sweep("apart"), jobs=2)
    assert "not a readable checkpoint" in (folder / "sweep-apart" / "n_heads-1_seed-2.log"
                                           ).read_text()


def test_bad_sweep_file_is_one_line(tmp_path):
    from transformer.config import ConfigError
    from transformer.sweep import load_sweep

    bad = tmp_path / "sweep.yaml"
    bad.write_text(f"base: {TINY_CONFIG}\ngrid:\n  model.n_hedas: [1, 2]\n")
    with pytest.raises(ConfigError, match="n_hedas"):
        load_sweep(str(bad))
    bad.write_text(f"base: {TINY_CONFIG}\ngrid:\n  model.n_heads: 4\n")
    with pytest.raises(ConfigError, match="grid: expected"):
        load_sweep(str(bad))
    for seeds in ("[1, 1]", "3", "[]", "[one]"):
        bad.write_text(f"base: {TINY_CONFIG}\ngrid:\n  model.n_heads: [4]\nseeds: {seeds}\n")
        with pytest.raises(ConfigError, match="seeds: expected a list of different integers"):
            load_sweep(str(bad))
    # Two points that would train into one folder (side by side with JOBS=N, at once).
    for points in ("grid:\n  model.n_heads: [1, 2]\npoints:\n  - {model.n_heads: 2}\n",
                   "points:\n  - {}\n  - {model.n_heads: 2}\n"):  # no grid: base is first
        bad.write_text(f"base: {TINY_CONFIG}\n{points}")
        with pytest.raises(ConfigError, match=r"point\(s\) (n_heads-2|base) given twice"):
            load_sweep(str(bad))
    bad.write_text(f"base: {TINY_CONFIG}\npoints:\n  - {{model.n_heads: 2}}\n")
    assert [p for p, _ in load_sweep(str(bad)).runs()] == [{}, {"model.n_heads": 2}]


@pytest.mark.parametrize("command", ["plot", "attention"])
def test_plot_and_attention_write_beside_the_run_or_else_here(tiny_run, tmp_path, monkeypatch,
                                                            capsys, command):
    # Root may write anywhere, so the read-only run folder is played by a savefig that
    # refuses it.
    import matplotlib.figure

    import transformer.cli as cli
    from transformer.visualize import pyplot

    pyplot()
    real_savefig = matplotlib.figure.Figure.savefig

    def read_only_run(fig, path, *args, **kwargs):
        if os.path.abspath(str(path)).startswith(os.path.abspath(tiny_run)):
            raise PermissionError(13, "Permission denied")
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", read_only_run)
    monkeypatch.chdir(tmp_path)
    if command == "plot":
        assert cli.plot_main([tiny_run]) == 0
    else:
        assert cli.attention_main(["--ckpt", f"{tiny_run}/last.pt", "one two three"]) == 0
    out, err = capsys.readouterr()
    assert f"cannot write the {'plots' if command == 'plot' else 'figures'} to {tiny_run}" in err
    assert "Permission denied" in err and len(err.strip().splitlines()) == 1
    written = [p for p in tmp_path.rglob("*.png")]
    assert written and all(str(p).startswith(str(tmp_path)) for p in written)


def test_probe_finds_each_word_among_the_pieces():
    from transformer.probe import find, word_pieces

    pieces = ["\u2581The", "\u2581ani", "<unk>", "al", "\u2581", "it", "\u2581st", "reet", ".",
              "</s>"]
    words = word_pieces("The animal it street.", pieces)
    assert find(words, "animal") == [1, 2, 3] and find(words, "it") == [4, 5]
    assert find(words, "street") == [6, 7, 8]  # "street." is the word "street"
    with pytest.raises(ValueError):
        word_pieces("The animal", pieces)


@needs_make
def test_make_probe_reports_the_pronoun_attention_of_every_layer(tiny_run, tmp_path):
    r = _make("probe", f"CKPT={tiny_run}/last.pt")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    summary = [line for line in lines if line.startswith("layer ") and "of 8 sentences" in line]
    assert len(summary) == 2  # the tiny model's two layers, the eight sentences of the file
    weights = [float(x) for line in lines if line.startswith("  layer")
               for x in line.split("|")[1].split(":")[1].replace("/", " ").split()]
    assert len(weights) == 8 * 2 * 2 * 2 and all(0 <= w <= 1 for w in weights)
    assert any("all heads of all layers" in line for line in lines)
    bad = tmp_path / "probe.yaml"
    bad.write_text("- sentence: The cat sat.\n  pronoun: it\n  candidates: [cat, mat]\n"
                   "  answer: cat\n")
    r = _make("probe", f"CKPT={tiny_run}/last.pt", f"PROBE={bad}")
    said = [line for line in r.stderr.splitlines() if not line.startswith("make")]  # make[1]:
    assert r.returncode == 2 and len(said) == 1
    assert "'it' is not a word of the sentence" in said[0]
