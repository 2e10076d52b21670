"""A small, complete training loop shared by every topic that trains a model.

    AdamW (decoupled weight decay on matrices only), learning rate with linear warmup then cosine
    decay to min_lr_fraction * learning_rate, gradient clipping by global norm, periodic evaluation
    on train and validation batches, a progress bar, divergence detection, and checkpoints saved
    atomically and loaded with torch.load(weights_only=True).

    lr(step) = lr_max * (step + 1) / warmup                             for step < warmup
             = lr_min + (lr_max - lr_min) * (1 + cos(pi * progress)) / 2   afterwards,
    progress = (step - warmup) / (steps - warmup),   steps counted from 0

    The warmup counts step 0 as the first step, so step 0 already trains at lr_max / warmup and step
    warmup - 1 reaches lr_max. Schedules written lr_max * step / warmup (as in many courses) start
    at 0 instead: the same ramp one step later, and a different value at every warmup step.

The model is any nn.Module mapping ids (B, T) to logits (B, T, V); pass `loss_fn` for anything else.
"""

import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from runtime import synchronize

try:
    from tqdm.auto import tqdm
except ImportError:  # the progress bar is a nicety, not a requirement
    tqdm = None


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, or does not fit the model it is loaded into."""


@dataclass
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 1e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float | None = 1.0
    eval_interval: int = 100
    eval_batches: int = 20
    progress: bool = True
    checkpoint_path: Path | None = None  # saved at each evaluation when set
    stop_on_divergence: bool = True  # stop when the loss becomes NaN/inf or explodes

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise ValueError(f"min_lr_fraction must be in [0, 1], got {self.min_lr_fraction}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.eval_interval < 1 or self.eval_batches < 1:
            raise ValueError(f"eval_interval and eval_batches must be >= 1, got {self.eval_interval}, "
                             f"{self.eval_batches}")


@dataclass
class TrainHistory:
    """Everything measured during training, per step and per evaluation."""

    train_loss: list = field(default_factory=list)  # per step
    learning_rate: list = field(default_factory=list)  # per step
    grad_norm: list = field(default_factory=list)  # per step, before clipping
    eval_steps: list = field(default_factory=list)
    eval_train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    tokens_seen: int = 0
    train_seconds: float = 0.0  # optimisation steps only, evaluation excluded
    diverged: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds > 0 else float("nan")

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else float("nan")


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr_fraction * learning_rate at the last step."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    min_lr = config.min_lr_fraction * config.learning_rate
    return min_lr + (config.learning_rate - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and embeddings only (not on biases and norm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas)


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's logits (B, T, V) against targets (B, T)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def evaluate(model, batch_fn: Callable[[str], tuple], split: str, batches: int, loss_fn=next_token_loss) -> float:
    """Mean loss over `batches` batches of `split`, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    losses = [loss_fn(model, *batch_fn(split)).item() for _ in range(batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(model: torch.nn.Module, batch_fn: Callable[[str], tuple], config: TrainConfig,
          device: torch.device | str = "cpu", loss_fn=next_token_loss, optimizer=None,
          on_eval: Callable[[int], None] | None = None) -> TrainHistory:
    """Train `model` in place on batches from batch_fn('train'), evaluating on batch_fn('val').

    Evaluation runs at step 0, every eval_interval steps and after the last step; on_eval(step), when
    given, runs right after each one (a demo measures there what the loss does not show, e.g. accuracy). When the loss
    turns non-finite (or exceeds 4x its first value) training stops and history.diverged is True.
    """
    optimizer = optimizer or make_optimizer(model, config)
    history = TrainHistory()
    model.train()
    bar = None
    if tqdm is not None and config.progress:
        bar = tqdm(total=config.steps, desc="train", mininterval=1.0, leave=False, disable=None)

    def run_eval(step):
        history.eval_steps.append(step)
        history.eval_train_loss.append(evaluate(model, batch_fn, "train", config.eval_batches, loss_fn))
        history.val_loss.append(evaluate(model, batch_fn, "val", config.eval_batches, loss_fn))
        if config.checkpoint_path is not None:
            save_checkpoint(config.checkpoint_path, model, optimizer, step=step)
        if on_eval is not None:
            on_eval(step)

    run_eval(0)
    for step in range(config.steps):
        lr = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batch_fn("train")
        synchronize(device)
        start = time.perf_counter()
        loss = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        loss_value = loss.item()  # .item() synchronises, so the timer below sees finished work
        history.train_seconds += time.perf_counter() - start
        history.tokens_seen += y.numel()
        history.train_loss.append(loss_value)
        history.learning_rate.append(lr)
        history.grad_norm.append(grad_norm.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if config.stop_on_divergence and (not math.isfinite(loss_value) or loss_value > 4 * history.train_loss[0]):
            history.diverged = True
            break
        if (step + 1) % config.eval_interval == 0 or step + 1 == config.steps:
            run_eval(step + 1)
    if bar is not None:
        bar.close()
    return history


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None, step: int = 0,
                    metadata: dict | None = None) -> Path:
    """Save model (and optimizer) state atomically: a crash mid-write never leaves a broken file behind.

    metadata must hold plain JSON-like values (TypeError otherwise, before anything is written), so
    that load_checkpoint's weights_only=True loader can always read the file back.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    _check_plain("metadata", metadata)  # load_checkpoint's weights_only=True refuses anything else
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "step": int(step), "metadata": metadata}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _check_plain(name: str, value) -> None:
    """TypeError unless value is built of None, bool, int, float, str, lists, tuples and str-keyed dicts."""
    # Exact types: subclasses such as numpy.float64 or an IntEnum pickle as classes the loader refuses.
    if value is None or type(value) in (bool, int, float, str):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(f"{name}[{i}]", item)
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{name} keys must be str, got {key!r}")
            _check_plain(f"{name}[{key!r}]", item)
        return
    raise TypeError(f"{name} must hold plain JSON-like values (None, bool, int, float, str, list, dict), "
                    f"got {type(value).__name__} {value!r}: convert it (str(path), float(x)) before saving")


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None,
                    map_location: torch.device | str = "cpu") -> dict:
    """Load a checkpoint written by save_checkpoint into model (and optimizer); returns step and metadata.

    Uses weights_only=True, so a file cannot run code when loaded. Raises FileNotFoundError for a
    missing file and CheckpointError for a corrupt one or one whose tensors do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {error}") from error
    except Exception as error:  # pickle.UnpicklingError and friends from a foreign or tampered file
        raise CheckpointError(f"checkpoint {path} could not be read safely (weights_only=True): {error}") from error
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not an LLM Lab checkpoint (no 'model' entry)")
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {error}") from error
    return {"step": state.get("step", 0), "metadata": state.get("metadata", {})}
