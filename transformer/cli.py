"""Command-line entry points: transformer-train, transformer-translate, transformer-evaluate.

Thin on purpose: parse arguments, load the config or checkpoint, call library
code. A user's mistake ends with one line on standard error and exit status 2.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from .checkpoint import (
    CheckpointError,
    average_checkpoints,
    model_from_checkpoint,
    save_checkpoint,
    step_checkpoints,
)
from .config import SECTIONS, ConfigError, load_config, with_overrides
from .data import DataError, columns, load_corpus, load_extra_split, tokenized_references
from .decode import translate
from .device import DeviceError, pick_device, resolve_precision
from .distributed import Stopped
from .runs import Interrupted, RunError

# Each command imports what only it needs when it runs (training, `datasets`, sacreBLEU,
# matplotlib), so that `make translate` does not wait for the others' imports (what that
# saves: README, "What a run costs").
USER_ERRORS = (ConfigError, DataError, CheckpointError, RunError, DeviceError)


class _TqdmHandler(logging.Handler):
    """Log lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging() -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for noisy in ("datasets", "fsspec", "urllib3", "httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run(main: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """Run main; a user's error prints one line and returns 2, Ctrl-C returns 130.

    SIGTERM and SIGHUP (a closed terminal) interrupt as Ctrl-C does, so that cleanup
    code runs (temporary files, half-trained tokenizers) instead of the process just
    ending. Training catches all three itself to save last.pt first.
    """
    _setup_logging()
    before = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM,
                                                                          signal.SIGHUP)}
    try:
        try:
            return main(sys.argv[1:] if argv is None else argv)
        finally:
            # The command has ended: the handlers as they were, before it says how. A
            # signal from here on (torchrun ending the other processes of a run whose peer
            # died) ends the process as it would have before, not as a KeyboardInterrupt
            # with a traceback from wherever Python is: printing how the command ended, or
            # tearing down (a progress bar's __del__).
            for signum, handler in before.items():
                signal.signal(signum, handler)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the system refused: full disk, no such folder, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except Stopped as e:  # under torchrun: process 0 has said why
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def latest_checkpoint(runs_dir: str = "runs") -> str:
    """The newest runs/*/best.pt."""
    found = glob.glob(os.path.join(runs_dir, "*", "best.pt"))
    if not found:
        raise CheckpointError(f"no checkpoint in {runs_dir}/*/best.pt; train one with "
                              "`make train` or name one with CKPT=path/to/best.pt")
    return max(found, key=os.path.getmtime)


# --- train -----------------------------------------------------------------------------

def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="transformer-train", description="Train a translation model.")
    p.add_argument("--config", default="configs/default.yaml", help="YAML config file")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue runs/<name> from its last.pt (train.* overrides allowed)")
    p.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="train in N processes (one per GPU, or on the CPU) with torchrun")
    p.add_argument("--torchrun", default="", metavar="OPTIONS",
                   help="torchrun's options for several machines, e.g. \"--nnodes=2 "
                        "--rdzv-backend=c10d --rdzv-endpoint=host:29500\" (default: "
                        "--standalone, this machine alone)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.n_heads=8 train.max_minutes=5")
    args = p.parse_intermixed_args(argv)  # options may follow the overrides
    from .train import resume, train

    run = args.resume
    if run is None:
        cfg = load_config(args.config, args.overrides)
        run = cfg.train.resume
    if args.nproc and "WORLD_SIZE" not in os.environ:  # not yet under torchrun: start it
        return _launch(args, argv, cfg if run is None else None)
    if run is not None:
        overrides = [o for o in args.overrides if not o.startswith("train.resume=")]
        run_dir = resume(run, overrides)
    else:
        run_dir = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, process 0 speaks for the run
        print(run_dir)
    return 0


def _launch(args, argv: list[str], cfg) -> int:
    """This command in args.nproc processes, once what can be checked here is."""
    from .distributed import launch

    if args.nproc < 1:
        raise ConfigError(f"--nproc: expected a positive number of processes, got {args.nproc}")
    if cfg is not None and pick_device(cfg.train.device).type == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if args.nproc > gpus:
            raise DeviceError(f"NPROC={args.nproc}: this machine has {gpus} GPU(s), one per "
                              f"process; use NPROC={gpus} or fewer, or train.device=cpu")
    if os.environ.get("TORCH_CPP_LOG_LEVEL") != "FATAL":
        # torch's C++ side prints a stack trace for each retry of an unreachable
        # rendezvous; it reads this once, when torch loads: start again with it quiet.
        env = dict(os.environ, TORCH_CPP_LOG_LEVEL="FATAL",
                   TRANSFORMER_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", ""))
        os.execve(sys.executable, [sys.executable, "-m", "transformer.cli", *argv], env)
    level = os.environ.pop("TRANSFORMER_CPP_LOG_LEVEL", "")  # the workers' own, as it was
    if level:
        os.environ["TORCH_CPP_LOG_LEVEL"] = level
    else:
        os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
    # The workers get the same arguments, less the launcher's own.
    worker_argv, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--nproc", "--torchrun"):
            skip = True
        elif not a.startswith(("--nproc=", "--torchrun=")):
            worker_argv.append(a)
    return launch(args.nproc, args.torchrun, worker_argv)


def train_main(argv: list[str] | None = None) -> int:
    return _run(_train, argv)


# --- the commands that decode with a checkpoint ------------------------------------------

def _decoding_flags(device: bool = True, several: bool = False) -> argparse.ArgumentParser:
    """The flags that translate, evaluate, attention and probe share."""
    p = argparse.ArgumentParser(add_help=False)
    if several:
        p.add_argument("--ckpt", nargs="+", metavar="CKPT",
                       help="checkpoint(s) (default: the newest runs/*/best.pt); with several, "
                            "also their mean, standard deviation and range (one run per seed)")
    else:
        p.add_argument("--ckpt", help="checkpoint (default: the newest runs/*/best.pt)")
    p.add_argument("--runs-dir", default="runs", help="where to look for the newest best.pt")
    p.add_argument("--beam", type=int, help="beam size (default: the config's; 1 is greedy)")
    if device:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def _for_decoding(ckpt: str, args, overrides: list[str] | None = None):
    """model, tokenizer, config and state of a checkpoint; the config with --beam and, for
    a command that reads the corpus, data.* and decode.* overrides (its paths checked)."""
    model, tokenizer, cfg, state = model_from_checkpoint(ckpt)
    if overrides is not None:
        cfg = with_overrides(cfg, overrides, ckpt, sections=("data", "decode"))
    if args.beam is not None:
        cfg = with_overrides(cfg, [f"decode.beam_size={args.beam}"], "--beam", check_paths=False)
    return model, tokenizer, cfg, state


# --- translate -------------------------------------------------------------------------

def _translate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="transformer-translate", parents=[_decoding_flags()],
        description="Translate sentences given as arguments, or standard input line by line.")
    p.add_argument("sentences", nargs="*", help="sentences to translate (default: stdin)")
    args = p.parse_args(argv)
    model, tokenizer, cfg, _ = _for_decoding(args.ckpt or latest_checkpoint(args.runs_dir), args)
    device, precision = _device_and_precision(args.device, cfg)
    model.to(device)
    if args.sentences:
        # Arguments that are not UTF-8 arrive with their bytes escaped; replace them.
        sentences = [s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                     for s in args.sentences]
        for line in translate(model, tokenizer, sentences, cfg.decode, device,
                              precision=precision):
            print(line)
        return 0
    # Standard input: translate in chunks so that long inputs stream with bounded memory.
    chunk: list[str] = []
    for number, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:  # translate what can be read; keep the line
            line = raw.decode("utf-8", "replace")
            logging.getLogger(__name__).warning(
                "standard input, line %d: not UTF-8; the bytes that are not were replaced "
                "by U+FFFD", number)
        chunk.append(line.rstrip("\r\n"))
        if len(chunk) == 512:
            _print_translations(model, tokenizer, chunk, cfg, device, precision)
            chunk = []
    if chunk:
        _print_translations(model, tokenizer, chunk, cfg, device, precision)
    return 0


def _device_and_precision(name: str, cfg):
    """The device asked for, and the precision the model was trained at, where it can run."""
    device = pick_device(name)
    return device, resolve_precision(cfg.train.precision, device, strict=False)


def _print_translations(model, tokenizer, lines, cfg, device, precision) -> None:
    """One output line per input line; an empty line stays empty."""
    todo = [i for i, line in enumerate(lines) if line.strip()]
    out = [""] * len(lines)
    for i, text in zip(todo, translate(model, tokenizer, [lines[i] for i in todo], cfg.decode,
                                       device, precision=precision)):
        out[i] = text
    sys.stdout.write("".join(text + "\n" for text in out))
    sys.stdout.flush()


def translate_main(argv: list[str] | None = None) -> int:
    return _run(_translate, argv)


# --- evaluate --------------------------------------------------------------------------

def _evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="transformer-evaluate",
                                parents=[_decoding_flags(several=True)],
                                description="Translate a split and score it with sacreBLEU.")
    p.add_argument("--split", nargs="+", default=["test"], metavar="SPLIT",
                   help="test, valid, or another test set of a local corpus folder by its "
                        "file stem (test_2017_flickr, test_2017_mscoco); several: each")
    p.add_argument("overrides", nargs="*", metavar="data.key=value",
                   help="where to find the corpus now (data.path=../shared/multi30k), or how "
                        "to search (decode.length_penalty=0.8)")
    args = p.parse_args(argv)
    from .evaluate import spread_table

    # `--split test data.path=x`: --split takes every word after it, overrides included.
    for name in ("ckpt", "split"):
        words = getattr(args, name) or []
        setattr(args, name, [w for w in words if not _is_override(w)] or None)
        args.overrides += [w for w in words if _is_override(w)]
    args.split = args.split or ["test"]
    ckpts = args.ckpt or [latest_checkpoint(args.runs_dir)]
    for ckpt in ckpts:  # a missing one fails now, not after an hour of translating
        if not os.path.isfile(ckpt):
            raise CheckpointError(f"{ckpt}: no such checkpoint")
    scores: dict[str, list] = {split: [] for split in args.split}
    for ckpt in ckpts:
        for split, s in _evaluate_checkpoint(ckpt, args).items():
            scores[split].append(s)
    if len(ckpts) > 1:
        print(f"\nover the {len(ckpts)} checkpoints: mean ± standard deviation "
              "(lowest-highest)")
        for line in spread_table(scores):
            print(line)
    return 0


def _is_override(word: str) -> bool:
    """'data.path=x' and the like; not a checkpoint path or a split name."""
    return word.split(".", 1)[0] in SECTIONS and "=" in word and not os.path.exists(word)


def _evaluate_checkpoint(ckpt: str, args) -> dict:
    """Translate and score every split asked for with one checkpoint; print and keep each."""
    from .evaluate import score

    model, tokenizer, cfg, state = _for_decoding(ckpt, args, args.overrides)
    corpus = load_corpus(cfg.data)
    for split in args.split:  # every split is found before any is translated
        if split not in corpus:
            if split in ("train", "valid", "test") or cfg.data.path is None:
                raise DataError(f"corpus {cfg.data.corpus!r} has no {split} split")
            corpus[split] = load_extra_split(cfg.data.path, split, cfg.data.src_lang,
                                             cfg.data.tgt_lang)
    device, precision = _device_and_precision(args.device, cfg)
    model.to(device)
    beam = cfg.decode.beam_size
    lp = cfg.decode.length_penalty
    search = "greedy" if beam == 1 else f"beam {beam}, length penalty {lp}"
    # In the file's name, so that another search setting does not overwrite its hypotheses.
    setting = "" if beam == 1 else f".beam{beam}" + ("" if lp == 1.0 else f".lp{lp:g}")
    scores = {}
    for split in args.split:
        src, refs = columns(corpus[split])
        tokenized = tokenized_references(cfg.data.path, split, cfg.data.tgt_lang)
        if tokenized is not None and len(tokenized[1]) != len(refs):
            raise DataError(f"{tokenized[0]} has {len(tokenized[1])} lines but the {split} "
                            f"split has {len(refs)}")
        start = time.time()
        hyps = translate(model, tokenizer, src, cfg.decode, device, precision=precision)
        seconds = time.time() - start
        out = os.path.join(os.path.dirname(ckpt) or ".",
                           f"{os.path.splitext(os.path.basename(ckpt))[0]}.{split}{setting}.hyp.txt")
        scores[split] = s = score(hyps, refs, tokenized, cfg.data.tgt_lang)
        print(f"{ckpt} (step {state['step']}) on {cfg.data.corpus} {split}: "
              f"{len(hyps)} sentences, {search}, translated in {seconds:.1f} s")
        for line in s.lines():
            print(line)
        sys.stdout.flush()  # the scores are out before anything can fail

        def write(path: str, hyps=hyps) -> str:
            with open(path, "w", encoding="utf-8") as f:
                f.write("".join(h + "\n" for h in hyps))
            return path

        written = _write_somewhere(write, "the hypotheses", out, os.path.basename(out))
        print(f"hypotheses: {written}")
    return scores


def _write_somewhere(write: Callable[[str], object], what: str, *places: str):
    """write(place) at the first place that can be written (beside the checkpoint or
    run, else the current folder), saying in one line why each before it could not."""
    for place in places:
        try:
            return write(place)
        except OSError as e:
            print(f"cannot write {what} to {place}: {e.strerror or e}", file=sys.stderr)
    raise RunError(f"{what} could not be written anywhere; see the lines above")


def evaluate_main(argv: list[str] | None = None) -> int:
    return _run(_evaluate, argv)


# --- average ---------------------------------------------------------------------------

def _average(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="transformer-average",
                                description="Average the last step checkpoints of a run.")
    p.add_argument("run", help="run folder with step-*.pt (train.keep_checkpoints > 0)")
    p.add_argument("--last", type=int, default=0, help="how many (default: all kept)")
    p.add_argument("--upto", type=int, default=0, metavar="STEP",
                   help="only those at or before this step, into average-upto-STEP.pt "
                        "(with --last 10: the recipe's average.pt had the run stopped there)")
    args = p.parse_args(argv)
    kept = step_checkpoints(args.run)
    if not kept:
        raise CheckpointError(f"{args.run}: no step-*.pt checkpoints; train with "
                              "train.keep_checkpoints=10 to keep them")
    paths = step_checkpoints(args.run, upto=args.upto)
    if not paths:
        raise CheckpointError(f"{args.run}: no step checkpoint at or before step "
                              f"{args.upto}; the first kept is {os.path.basename(kept[0])}")
    if args.last:
        paths = paths[-args.last:]
    name = f"average-upto-{args.upto}.pt" if args.upto else "average.pt"
    out = os.path.join(args.run, name)
    save_checkpoint(out, average_checkpoints(paths))
    print(f"{out}: the average of {len(paths)} checkpoints "
          f"({os.path.basename(paths[0])} .. {os.path.basename(paths[-1])})")
    return 0


def average_main(argv: list[str] | None = None) -> int:
    return _run(_average, argv)


# --- attention, plot, sweep ------------------------------------------------------------

def _attention(argv: list[str]) -> int:
    from .visualize import draw_attention, translate_with_attention

    p = argparse.ArgumentParser(
        prog="transformer-attention", parents=[_decoding_flags(device=False)],
        description="Translate a sentence and draw the heatmaps of all three attentions.")
    p.add_argument("sentence", help="the sentence to translate")
    p.add_argument("--out", help="folder for the PNGs (default: <run>/attention/<sentence>)")
    args = p.parse_args(argv)
    if not args.sentence.strip():
        raise DataError("the sentence is empty; give one with SENTENCE=\"...\"")
    ckpt = args.ckpt or latest_checkpoint(args.runs_dir)
    model, tokenizer, cfg, _ = _for_decoding(ckpt, args)
    dec = cfg.decode
    maps = translate_with_attention(model, tokenizer, args.sentence, dec.beam_size,
                                    dec.max_len_a, dec.max_len_b)
    slug = "-".join("".join(c if c.isalnum() else " " for c in args.sentence).split())[:60]
    out = args.out or os.path.join(os.path.dirname(ckpt) or ".", "attention", slug or "sentence")
    print(f"{args.sentence}\n{maps.translation}")
    sys.stdout.flush()
    paths = _write_somewhere(lambda place: draw_attention(maps, place), "the figures", out,
                             *([] if args.out else [os.path.join("attention", slug or "sentence")]))
    out = os.path.dirname(paths[-1])
    print(f"{len(paths) - 1} figures in {out}/ (one per attention and layer, a panel per head "
          "and the mean)")
    print(f"index: {paths[-1]}")
    return 0


def attention_main(argv: list[str] | None = None) -> int:
    return _run(_attention, argv)


def _probe(argv: list[str]) -> int:
    from .probe import load_items, probe, report

    p = argparse.ArgumentParser(
        prog="transformer-probe", parents=[_decoding_flags(device=False)],
        description="Where the encoder self-attention of a pronoun goes: onto the noun it "
                    "refers to, or the other one?")
    p.add_argument("--file", default="configs/probe.yaml", help="the probe sentences")
    args = p.parse_args(argv)
    items = load_items(args.file)
    ckpt = args.ckpt or latest_checkpoint(args.runs_dir)
    model, tokenizer, cfg, state = _for_decoding(ckpt, args)
    print(f"{ckpt} (step {state['step']}): encoder self-attention from the pronoun onto each "
          f"candidate, weights summed over the candidate's pieces")
    for line in report(probe(model, tokenizer, items, cfg.decode.beam_size)):
        print(line)
    return 0


def probe_main(argv: list[str] | None = None) -> int:
    return _run(_probe, argv)


def _plot(argv: list[str]) -> int:
    from .visualize import plot_run, plot_runs

    p = argparse.ArgumentParser(prog="transformer-plot",
                                description="Draw a run's loss, validation BLEU and learning "
                                            "rate against steps; given several runs (or a "
                                            "sweep folder), draw them side by side.")
    p.add_argument("runs", nargs="+", metavar="run",
                   help="run folder holding metrics.jsonl, or a folder of such runs")
    p.add_argument("--x", choices=("step", "epochs"), default="step",
                   help="the x axis: updates, or epochs trained (for runs whose updates "
                        "differ in size: train.batch_tokens, accumulate, processes)")
    args = p.parse_args(argv)
    runs, x = _run_folders(args.runs), args.x
    if len(runs) == 1:
        paths = _write_somewhere(lambda place: plot_run(runs[0], place, x), "the plots",
                                 runs[0], os.path.basename(os.path.normpath(runs[0])))
    else:
        parent = os.path.commonpath([os.path.abspath(r) for r in runs])
        paths = [_write_somewhere(lambda place: plot_runs(runs, place, x), "the plot", parent,
                                  ".")]
    for path in paths:
        print(path)
    return 0


def _run_folders(paths: list[str]) -> list[str]:
    """The runs named: a folder with metrics.jsonl, or a folder of them (a sweep's).
    Among several paths (a glob), files such as a sweep's results.md are passed over."""
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            runs.append(path)
        elif os.path.isdir(path) and (inside := sorted(
                os.path.join(path, d) for d in os.listdir(path)
                if os.path.isfile(os.path.join(path, d, "metrics.jsonl")))):
            runs.extend(inside)
        elif not (len(paths) > 1 and os.path.isfile(path)):
            raise RunError(f"{path}: no metrics.jsonl; name a run folder, e.g. RUN=runs/<name>")
    if not runs:
        raise RunError(f"no run folder among {' '.join(paths)}")
    return runs


def plot_main(argv: list[str] | None = None) -> int:
    return _run(_plot, argv)


def _sweep(argv: list[str]) -> int:
    from .sweep import run_sweep

    p = argparse.ArgumentParser(prog="transformer-sweep",
                                description="Train every point of a grid over config keys and "
                                            "tabulate size, speed and BLEU.")
    p.add_argument("sweep", nargs="?", default="configs/sweep.yaml", help="sweep file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="for every run, after the file's own (data.path=../shared/multi30k)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at a time, each in its own process (on a GPU, where "
                        "a small model's step is bound by the host)")
    args = p.parse_intermixed_args(argv)
    if args.jobs < 1:
        raise RunError(f"--jobs {args.jobs}: expected 1 or more runs at a time")
    for path in run_sweep(args.sweep, args.overrides, args.jobs):
        print(path)
    return 0


def sweep_main(argv: list[str] | None = None) -> int:
    return _run(_sweep, argv)


if __name__ == "__main__":  # torchrun's workers: python -m transformer.cli [train's arguments]
    sys.exit(train_main())
