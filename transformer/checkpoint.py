"""Self-sufficient checkpoints: config, tokenizer, weights, optimizer, schedule, step.

Written atomically (temporary file, flush, fsync, rename) so that a process
killed at any moment leaves the old checkpoint or the new one, never half of
one. Read with `weights_only=True`: a checkpoint is data, never code.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import zipfile

import torch

from .config import Config, ConfigError, from_dict
from .model import Transformer, build_model
from .tokenizer import Tokenizer

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line for the user."""


def save_checkpoint(path: str, state: dict) -> None:
    """Write state to path atomically."""
    for stale in glob.glob(f"{glob.escape(path)}.tmp*"):  # left by a killed process
        os.unlink(stale)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str) -> dict:
    """The state saved by save_checkpoint, loaded without unpickling arbitrary objects."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (format {FORMAT})")
    return state


def step_checkpoint_name(step: int) -> str:
    """The file name of a run's checkpoint at a step, kept for averaging."""
    return f"step-{step:06d}.pt"


def step_checkpoints(run_dir: str, upto: int = 0) -> list[str]:
    """The step-<step>.pt files of a run, oldest first; with upto, those at or before it.
    Other files that match step-*.pt (a copy a user made, "step-000100 copy.pt") are not
    the run's: they are neither averaged nor removed."""
    steps = {path: int(found.group(1))
             for path in glob.glob(os.path.join(run_dir, "step-*.pt"))
             if (found := re.fullmatch(r"step-(\d+)\.pt", os.path.basename(path)))}
    return sorted((path for path, step in steps.items() if not upto or step <= upto),
                  key=steps.get)


def average_checkpoints(paths: list[str]) -> dict:
    """The last checkpoint's state with its weights replaced by the mean over all paths.

    Averaging the last few checkpoints of a run smooths the noise of the final
    updates and usually gains BLEU for free (Vaswani et al., section 6.1).
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    states = [load_checkpoint(p) for p in paths]
    last = states[-1]
    for path, state in zip(paths, states):
        if state["config"]["model"] != last["config"]["model"]:
            raise CheckpointError(f"{path}: a different model from {paths[-1]}; cannot average")
    weights = {}
    for key, value in last["model"].items():
        if value.is_floating_point():
            total = sum(s["model"][key].double() for s in states)
            weights[key] = (total / len(states)).to(value.dtype)
        else:
            weights[key] = value
    kept = {k: v for k, v in last.items() if k not in ("optimizer", "scheduler", "format")}
    return {**kept, "model": weights, "averaged": [os.path.basename(p) for p in paths]}


def model_from_checkpoint(path: str) -> tuple[Transformer, Tokenizer, Config, dict]:
    """Rebuild model, tokenizer and config from a checkpoint alone."""
    state = load_checkpoint(path)
    try:
        cfg = from_dict(state["config"], source=f"{path} (saved config)", name=state["name"],
                        check_paths=False)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    try:
        tokenizer = Tokenizer.from_dict(state["tokenizer"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the tokenizer in it cannot be read ({e})") from None
    weights = state.get("model", {})
    for name, vocab in (("src_embed.token.weight", tokenizer.src_vocab),
                        ("tgt_embed.token.weight", tokenizer.tgt_vocab)):
        if name in weights and weights[name].size(0) != vocab:
            raise CheckpointError(f"{path}: the tokenizer has {vocab} pieces but the weights "
                                  f"expect {weights[name].size(0)}; they do not belong together")
    model = build_model(cfg, tokenizer)
    try:
        model.load_state_dict(stack_projections(state["model"]))
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not match the saved config "
                              f"({str(e).splitlines()[0]})") from None
    return model, tokenizer, cfg, state


def stack_projections(weights: dict) -> dict:
    """Weights saved with separate w_q, w_k, w_v (before the stacked projections) -> stacked."""
    weights = dict(weights)
    for key in [k for k in weights if k.endswith(".w_k.weight") or k.endswith(".w_k.bias")]:
        prefix, kind = key.rsplit(".w_k.", 1)
        parts = [weights.pop(f"{prefix}.w_{n}.{kind}") for n in "kv"]
        if ".cross_attn" in prefix:
            weights[f"{prefix}.w_kv.{kind}"] = torch.cat(parts)
        else:
            weights[f"{prefix}.w_qkv.{kind}"] = torch.cat([weights.pop(f"{prefix}.w_q.{kind}"),
                                                           *parts])
    return weights

