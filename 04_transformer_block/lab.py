"""The standard lab model: its size, its training recipe, its data, and one trained copy shared by every topic.

    lab_model_config(V)        nanoGPT's CPU reference size: 4 layers x 4 heads, 128 dims, context 64
    lab_train_config()         nanoGPT's character-Shakespeare CPU schedule (2000 steps, lr 1e-3, ...)
    char_shakespeare_data()    character-level batches of load_corpus("auto"), split 90/10, with their generator
    short_schedule(steps)      the reference schedule shrunk to a few hundred steps, for ablations
    train_lab_variant(...)     a fresh lab model with config overrides, same seed and batch order every time
    unigram_loss(data)         the loss of the best context-free guess: the level "learned nothing" sits at
    trained_lab_model(preset)  the lab model trained once and cached on disk, for 05, 06, 09, 14, 15 ...

The cached model is keyed by its configuration, its schedule, the corpus and the source code of the files
that define it (a change to any of them trains a new one); it is saved atomically and loaded with
weights_only=True, and a stale, corrupt or foreign file is retrained, never used.
"""

import ast
import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from data import CharVocab, load_corpus, random_batch, train_val_split
from runtime import Timer
from training import CheckpointError, TrainConfig, TrainHistory, evaluate, load_checkpoint, save_checkpoint, train
from transformer import MiniFormer, TransformerConfig


def lab_model_config(vocab_size: int, **overrides) -> TransformerConfig:
    """nanoGPT's CPU reference size: 4 layers, 4 heads, 128 dims, context 64, pre-norm LayerNorm, GELU,
    learned positions, dropout 0, tied weights (~0.8 M parameters besides the embeddings)."""
    settings = dict(vocab_size=vocab_size, context_length=64, num_layers=4, num_heads=4, embed_dim=128,
                    norm="layernorm", ffn="gelu", position="learned", norm_placement="pre", dropout=0.0,
                    tie_weights=True)
    settings.update(overrides)
    return TransformerConfig(**settings)


def lab_train_config(**overrides) -> TrainConfig:
    """nanoGPT's character-Shakespeare CPU schedule: 2000 steps, lr 1e-3 with 100 warmup steps then cosine to
    1e-4, AdamW betas (0.9, 0.99) (beta2 0.99 because each step sees few tokens), weight decay 0.1, clip 1.0,
    evaluation every 250 steps on 20 batches. Batch 12 x context 64 is set by the batches."""
    settings = dict(steps=2000, learning_rate=1e-3, min_lr_fraction=0.1, warmup_steps=100, weight_decay=0.1,
                    betas=(0.9, 0.99), grad_clip=1.0, eval_interval=250, eval_batches=20)
    settings.update(overrides)
    return TrainConfig(**settings)


def short_schedule(steps: int, **overrides) -> TrainConfig:
    """The reference schedule shrunk to `steps`: warmup a tenth of it (at most 100), 8 evaluations, no bar."""
    settings = dict(steps=steps, warmup_steps=max(1, min(100, steps // 10)), eval_interval=max(1, steps // 8),
                    eval_batches=10, progress=False)
    settings.update(overrides)
    return lab_train_config(**settings)


@dataclass
class LabData:
    """Character-level batches and the generator that draws them (reseed it to replay the same batches)."""

    batch_fn: object  # batch_fn("train" | "val") -> (x, y), each (batch_size, context_length)
    vocab: CharVocab
    corpus: str  # "shakespeare" or "pydoc"
    generator: torch.Generator
    context_length: int
    batch_size: int


def char_shakespeare_batches(context_length: int, batch_size: int, device, generator: torch.Generator | None = None):
    """(batch_fn, vocab, corpus_name): character-level batches of load_corpus("auto") (Shakespeare, or the
    offline pydoc text), split 90/10. batch_fn("train" | "val") -> (x, y) of shape (batch_size, context_length)."""
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size and context_length must be >= 1, got {batch_size}, {context_length}")
    text, corpus_name = load_corpus("auto")
    vocab = CharVocab(text)
    train_data, val_data = train_val_split(vocab.encode(text), val_fraction=0.1)
    splits = {"train": train_data, "val": val_data}

    def batch_fn(split: str):
        if split not in splits:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return random_batch(splits[split], batch_size, context_length, generator=generator, device=device)

    return batch_fn, vocab, corpus_name


def char_shakespeare_data(context_length: int = 64, batch_size: int = 12, device="cpu", seed: int = 0) -> LabData:
    """char_shakespeare_batches with its own generator, kept with the batches so runs can replay them."""
    generator = torch.Generator().manual_seed(seed)
    batch_fn, vocab, corpus = char_shakespeare_batches(context_length, batch_size, device, generator)
    return LabData(batch_fn, vocab, corpus, generator, context_length, batch_size)


def train_lab_variant(data: LabData, schedule: TrainConfig, seed: int = 0, device="cpu", prepare=None,
                      **config_overrides) -> tuple[MiniFormer, TrainHistory]:
    """Train a fresh lab model (lab_model_config with overrides, context = the data's) on `schedule`.

    Every variant starts from the same seed and sees the same sequence of batches, so two variants differ
    only by what the overrides change. `prepare(model)`, when given, edits the model before training.
    """
    torch.manual_seed(seed)
    data.generator.manual_seed(seed)
    config_overrides.setdefault("context_length", data.context_length)
    model = MiniFormer(lab_model_config(data.vocab.size, **config_overrides)).to(device)
    if prepare is not None:
        prepare(model)
    history = train(model, data.batch_fn, schedule, device=device)
    return model, history


def fixed_validation_windows(data: LabData, batches: int, seed: int) -> list:
    """The same validation windows for every model a demo compares (drawn once, with their own seed)."""
    data.generator.manual_seed(seed + 12345)
    return [data.batch_fn("val") for _ in range(batches)]


@torch.no_grad()
def validation_loss(model, windows) -> float:
    """Mean next-token cross-entropy over fixed (x, y) windows, in eval mode; the mode is restored."""
    was_training = model.training
    model.eval()
    losses = [torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in windows]
    model.train(was_training)
    return sum(losses) / len(losses)


def unigram_loss(data: LabData, batches: int = 200, seed: int = 0) -> float:
    """Validation loss of the best context-free guess: character frequencies counted on `batches` training
    batches (add-one smoothed), scored on `batches` validation batches. A model at this level has learned
    which characters are common, and nothing from the context."""
    data.generator.manual_seed(seed)
    counts = torch.ones(data.vocab.size)
    for _ in range(batches):
        counts += torch.bincount(data.batch_fn("train")[1].flatten().cpu(), minlength=data.vocab.size)
    log_probs = torch.log(counts / counts.sum())
    val_targets = torch.cat([data.batch_fn("val")[1].flatten().cpu() for _ in range(batches)])
    return -log_probs[val_targets].mean().item()


# ---------------------------------------------------------------------------------------------------
# One trained lab model, shared by the topics that study a trained model (sampling, caches, ...)
# ---------------------------------------------------------------------------------------------------

# "quick": small and short, for smoke runs (~10 s on 2 cores); "full": the reference recipe (~2 minutes);
# "large": wider and longer, a better judge of text quality (05 scores samples with it).
PRESETS = {
    "quick": dict(model=dict(num_layers=2, num_heads=4, embed_dim=64), train=dict(steps=300, warmup_steps=30)),
    "full": dict(model=dict(), train=dict()),
    "large": dict(model=dict(num_layers=6, num_heads=6, embed_dim=192), train=dict(steps=2000)),
}
_SOURCES = ("transformer.py", "lab.py")  # with 00_utils' training.py and data.py, below


@dataclass
class TrainedLabModel:
    model: MiniFormer  # in eval mode, on the requested device
    data: LabData  # the batches it was trained on (context and batch size of the preset)
    record: dict  # preset, key, val_loss, train_seconds, tokens_per_second, corpus, path, from_cache


def model_cache_dir() -> Path:
    """$LLM_LAB_MODELS, else ~/.cache/llm_lab/models (XDG_CACHE_HOME honoured): one place, whatever LLM_LAB_DATA
    points at (the corpus folder may be a read-only copy shared by many checkouts)."""
    if os.environ.get("LLM_LAB_MODELS"):
        return Path(os.environ["LLM_LAB_MODELS"]).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "llm_lab" / "models"


def _code_version() -> str:
    """SHA-256 of the code that defines the model, its training and its data, read as syntax trees without
    docstrings: editing a comment, a docstring or the layout keeps the cached model, editing code retrains it."""
    import data as data_module
    import training as training_module

    here = Path(__file__).resolve().parent
    files = [here / name for name in _SOURCES] + [Path(data_module.__file__), Path(training_module.__file__)]
    digest = hashlib.sha256()
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:16]


def _numerics(device) -> str:
    """What else decides the trained weights: the device type, and on a CPU the number of torch threads (a
    matmul splits its sums by thread, so 1 and 2 threads train measurably different models from one seed)."""
    device = torch.device(device)
    return f"cpu, torch threads={torch.get_num_threads()}" if device.type == "cpu" else device.type


def _cache_key(preset: str, config: TransformerConfig, schedule: TrainConfig, corpus: str, seed: int,
               numerics: str) -> str:
    description = {"preset": preset, "config": asdict(config), "schedule": asdict(schedule), "corpus": corpus,
                   "seed": seed, "code": _code_version(), "numerics": numerics}
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def trained_lab_model(preset: str = "full", device="cpu", seed: int = 0, retrain: bool = False,
                      verbose: bool = True) -> TrainedLabModel:
    """The lab model trained with `preset` ("quick" | "full" | "large"), from the disk cache when a valid one
    exists, else trained now (and cached). Quick runs use "quick"; the full demos use "full" or "large"."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    settings = PRESETS[preset]
    context_length = settings["model"].get("context_length", 64)
    data = char_shakespeare_data(context_length, 12, device, seed)
    config = lab_model_config(data.vocab.size, **settings["model"])
    schedule = lab_train_config(progress=verbose, **settings["train"])
    key = _cache_key(preset, config, replace(schedule, progress=False), data.corpus, seed, _numerics(device))
    path = model_cache_dir() / f"lab-{preset}-{key}.pt"
    model = MiniFormer(config).to(device)
    if path.is_file() and not retrain:
        try:
            saved = load_checkpoint(path, model, map_location=device)
            if saved["metadata"].get("key") == key:
                if verbose:
                    print(f"  lab model '{preset}': loaded {path.name} (val loss {saved['metadata']['val_loss']:.3f})")
                return TrainedLabModel(model.eval(), data, {**saved["metadata"], "path": str(path), "from_cache": True})
        except CheckpointError as error:
            if verbose:
                print(f"  lab model '{preset}': cached file unusable ({error}); retraining")
        model = MiniFormer(config).to(device)
    if verbose:
        print(f"  lab model '{preset}': training {schedule.steps} steps on {data.corpus} (cached afterwards in "
              f"{path.parent})")
    torch.manual_seed(seed)
    with Timer(device) as timer:
        history = train(model, data.batch_fn, schedule, device=device)
    data.generator.manual_seed(seed + 1)
    metadata = {"key": key, "preset": preset, "corpus": data.corpus, "steps": schedule.steps,
                "numerics": _numerics(device),
                "val_loss": float(evaluate(model, data.batch_fn, "val", 100)),
                "train_seconds": float(timer.seconds), "tokens_per_second": float(history.tokens_per_second),
                "parameters": int(model.num_parameters())}
    try:
        save_checkpoint(path, model, metadata=metadata)
    except OSError as error:  # a read-only cache costs a retrain next time, never a failure
        if verbose:
            print(f"  lab model '{preset}': could not cache it in {path.parent} ({error})")
    return TrainedLabModel(model.eval(), data, {**metadata, "path": str(path), "from_cache": False})
