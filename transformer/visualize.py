"""Pictures: attention maps of a translation, and training curves of a run.

Attention maps come from the model that translates: the sentence is translated as
`make translate` would, then the source and the translation go through the model
once more on the reference attention path (attention.reference_attention), which
returns the weights that the fast path computes but does not return. Teacher
forcing the model's own output gives the same weights as the step-by-step search
(the cache test shows that both compute the same thing).

matplotlib draws off-screen (the Agg backend): no display is needed.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass

import torch

from .decode import beam_search, greedy_decode
from .model import Transformer
from .tokenizer import BOS, EOS, Tokenizer

KINDS = {  # file name part -> title
    "encoder-self": "encoder self-attention",
    "decoder-self": "masked decoder self-attention",
    "encoder-decoder": "encoder-decoder attention",
}


@torch.no_grad()
def attention_weights(model: Transformer, src: torch.Tensor, tgt: torch.Tensor) -> dict:
    """src (B, S), tgt (B, T) = <s> y_1 .. y_n -> the weights of every attention.

    Returns {"encoder-self": [(B, H, S, S)] * L, "decoder-self": [(B, H, T, T)] * L,
    "encoder-decoder": [(B, H, T, S)] * L}, one tensor per layer, rows = queries.
    """
    model.eval()
    modules = model.attention_modules()
    for m in modules:
        m.use_reference = True
    try:
        model(src, tgt)
        return {
            "encoder-self": [layer.self_attn.last_weights for layer in model.encoder_layers],
            "decoder-self": [layer.self_attn.last_weights for layer in model.decoder_layers],
            "encoder-decoder": [layer.cross_attn.last_weights for layer in model.decoder_layers],
        }
    finally:
        for m in modules:
            m.use_reference, m.last_weights = False, None


@dataclass
class AttentionMaps:
    """One sentence's translation with its attention weights and the pieces that label them."""

    source: str
    translation: str
    src_pieces: list[str]  # the source pieces and </s>
    tgt_in: list[str]  # <s> and the translation's pieces: what the decoder reads
    tgt_out: list[str]  # the translation's pieces and </s>: what the decoder writes
    weights: dict  # as attention_weights returns, batch of one


def translate_with_attention(model: Transformer, tokenizer: Tokenizer, sentence: str,
                             beam: int = 1, max_len_a: float = 1.3,
                             max_len_b: int = 10) -> AttentionMaps:
    """Translate one sentence (greedy or beam) and collect its attention weights."""
    limit = model.cfg.max_positions - 1
    ids = tokenizer.encode_src([sentence])[0][:limit]
    src = torch.tensor([ids])
    max_len = min(int(max_len_a * len(ids) + max_len_b), limit)
    hyp = (greedy_decode(model, src, [max_len]) if beam == 1
           else beam_search(model, src, [max_len], beam))[0]
    tgt = torch.tensor([[BOS, *hyp.ids]])
    piece = tokenizer.tgt.id_to_piece
    return AttentionMaps(
        source=sentence,
        translation=tokenizer.decode_tgt([hyp.ids])[0],
        src_pieces=[tokenizer.src.id_to_piece(i) for i in ids],
        tgt_in=[piece(i) for i in [BOS, *hyp.ids]],
        tgt_out=[piece(i) for i in [*hyp.ids, EOS]],
        weights=attention_weights(model, src, tgt),
    )


def pyplot():
    """matplotlib.pyplot on the off-screen Agg backend, imported only when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_attention(maps: AttentionMaps, out_dir: str) -> list[str]:
    """One PNG per attention kind and layer, a panel per head and one for their mean.

    Writes index.html showing them all; returns the paths of the PNGs and the index.
    """
    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    labels = {  # kind -> (rows, columns)
        "encoder-self": (maps.src_pieces, maps.src_pieces),
        "decoder-self": (maps.tgt_out, maps.tgt_in),
        "encoder-decoder": (maps.tgt_out, maps.src_pieces),
    }
    axis_names = {"encoder-self": ("source query", "source key"),
                  "decoder-self": ("writes (query)", "reads (key)"),
                  "encoder-decoder": ("writes (query)", "source (key)")}
    paths = []
    for kind, layers in maps.weights.items():
        rows, cols = labels[kind]
        for n, w in enumerate(layers, start=1):
            w = w[0].float()  # (H, rows, cols)
            panels = [*w, w.mean(0)]
            titles = [f"head {h + 1}" for h in range(w.size(0))] + ["mean over heads"]
            ncol = min(len(panels), 3)
            nrow = math.ceil(len(panels) / ncol)
            side = max(2.5, 0.28 * max(len(rows), len(cols)) + 1.2)
            fig, axes = plt.subplots(nrow, ncol, figsize=(side * ncol, side * nrow),
                                     squeeze=False)
            for ax in axes.flat[len(panels):]:
                ax.axis("off")
            for ax, panel, title in zip(axes.flat, panels, titles):
                ax.imshow(panel.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
                ax.set_title(title, fontsize=9)
                ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
                ax.set_yticks(range(len(rows)), rows, fontsize=7)
                ax.set_xlabel(axis_names[kind][1], fontsize=7)
                ax.set_ylabel(axis_names[kind][0], fontsize=7)
            fig.suptitle(f"{KINDS[kind]}, layer {n}", fontsize=11)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{kind}-layer{n}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write("<!doctype html><meta charset='utf-8'><title>attention</title>\n"
                f"<h1>Attention</h1><p>source: {html.escape(maps.source)}<br>"
                f"translation: {html.escape(maps.translation)}</p>\n")
        for kind, title in KINDS.items():
            f.write(f"<h2>{title}</h2>\n")
            for p in paths:
                if os.path.basename(p).startswith(kind + "-layer"):
                    f.write(f"<img src='{os.path.basename(p)}' style='max-width:100%'><br>\n")
    return [*paths, index]


def read_metrics(path: str) -> list[dict]:
    """The records of a run's metrics.jsonl; a torn last line (a killed run) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """One key of a run's records against x ("step", or "epochs": epochs trained), in step
    order, the average's record left out. A resumed run may log a step twice: the later
    record wins."""
    points = {r["step"]: r[key] for r in records if key in r and "average_of" not in r}
    steps = sorted(points)
    at = epochs_at(records) if x == "epochs" else {s: s for s in steps}
    return [at[s] for s in steps], [points[s] for s in steps]


def epochs_at(records: list[dict]) -> dict[int, float]:
    """Epochs trained at each step logged: the records' "epochs". Older runs' records
    lack it; for them it is worked out from the epoch in progress. With U updates an
    epoch, step s is in epoch ceil(s / U), so U is at least s / epoch, and the largest
    such ratio logged is U (or just under it; in the first epoch, the last step logged)."""
    per_epoch = max((r["step"] / r["epoch"] for r in records if r.get("epoch")), default=1)
    return {r["step"]: r.get("epochs", r["step"] / per_epoch) for r in records if "step" in r}


X_LABELS = {"step": "step", "epochs": "epochs (passes over the training data)"}


def plot_run(run_dir: str, out_dir: str | None = None, x: str = "step") -> list[str]:
    """loss.png, bleu.png, lr.png and stability.png (loss, gradient norm and learning rate
    together) against steps (or x="epochs"), from run_dir/metrics.jsonl, into out_dir
    (default: the run folder)."""
    plt = pyplot()
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    figures = {
        "loss.png": ("loss (label-smoothed cross-entropy)",
                     [("train loss", "loss"), ("validation loss", "valid_loss")]),
        "bleu.png": ("validation BLEU (greedy)", [("validation BLEU", "valid_bleu")]),
        "lr.png": ("learning rate", [("learning rate", "lr")]),
    }
    paths = []
    for name, (title, lines) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, key in lines:
            ax.plot(*series(records, key, x), label=label,
                    marker="o" if key.startswith("valid") else None, markersize=3)
        ax.set_xlabel(X_LABELS[x])
        ax.set_title(f"{os.path.basename(os.path.normpath(run_dir))}: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    paths.append(_stability(plt, run_dir, out_dir, records, x))
    return paths


def _stability(plt, run_dir: str, out_dir: str, records: list[dict], x: str) -> str:
    """stability.png: loss, gradient norm (before clipping) and learning rate, one above
    the other on one x axis. A run that stalls shows it here: its gradient norm jumps
    or creeps up as the learning rate peaks, and its loss stops falling."""
    panels = [("loss", [("train", "loss"), ("validation", "valid_loss")]),
              ("gradient norm (before clipping)", [("gnorm", "gnorm")]),
              ("learning rate", [("lr", "lr")])]
    fig, axes = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
    for ax, (title, lines) in zip(axes, panels):
        for label, key in lines:
            ax.plot(*series(records, key, x), label=label,
                    marker="o" if key.startswith("valid") else None, markersize=3)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel(X_LABELS[x])
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)), fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "stability.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[str], out_dir: str, x: str = "step") -> str:
    """compare.png: several runs side by side (seeds of a recipe, say), one line each, in
    three panels on one x axis: validation loss, validation BLEU and gradient norm.
    A seed that stalls stands out: its validation loss stays above the others'. Runs of
    different update sizes compare against x="epochs": a step of one is not a step of
    the other."""
    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    panels = [("validation loss", "valid_loss"), ("validation BLEU (greedy)", "valid_bleu"),
              ("gradient norm (before clipping)", "gnorm")]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for run_dir in run_dirs:
        records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        label = os.path.basename(os.path.normpath(run_dir))
        for ax, (_, key) in zip(axes, panels):
            ax.plot(*series(records, key, x), label=label, linewidth=1,
                    marker="o" if key.startswith("valid") else None, markersize=2)
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel(X_LABELS[x])
    fig.tight_layout()
    path = os.path.join(out_dir, "compare.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
