"""Corpora and batching: offline English by default, Shakespeare downloaded once and verified.

Corpora
  - ``pydoc_text()``: the Python standard library's help topics (``pydoc_data``), ~465 kB of real
    English that ships with every Python, so every demo runs offline.
  - ``shakespeare_text()``: the tiny-Shakespeare corpus (1,115,394 bytes), downloaded once from its
    canonical address into ``$LLM_LAB_DATA`` (else ``~/.cache/llm_lab``) and verified by SHA-256.
    A cached copy that fails the checksum is never used.
  - ``load_corpus(name)``: either by name; ``"auto"`` prefers Shakespeare and falls back to pydoc
    with a printed message when it cannot be had offline.

Batching: character-level and byte-level encodings, a train/val split and random-window batches
``x[b] = data[i : i + T]``, ``y[b] = data[i + 1 : i + T + 1]``.
"""

import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILENAME = "tinyshakespeare.txt"
CORPUS_NAMES = ("auto", "shakespeare", "pydoc")
_fallback_reported = False  # load_corpus("auto") prints its fallback message once per process


class CorpusUnavailableError(RuntimeError):
    """The corpus is neither cached (with a valid checksum) nor downloadable."""


def data_dir() -> Path:
    """Where corpora are cached: $LLM_LAB_DATA if set, else ~/.cache/llm_lab (XDG_CACHE_HOME honoured)."""
    if os.environ.get("LLM_LAB_DATA"):
        return Path(os.environ["LLM_LAB_DATA"]).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "llm_lab"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pydoc_text() -> str:
    """The standard library's pydoc help topics joined in sorted order: offline English prose and code."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def shakespeare_path(download: bool = True, url: str = SHAKESPEARE_URL, timeout: float = 30.0) -> Path:
    """Path of a verified copy of tiny-Shakespeare, downloading it into data_dir() when needed.

    A cached file whose SHA-256 differs from the published one is reported and replaced, never used.
    Raises CorpusUnavailableError, naming $LLM_LAB_DATA, when no verified copy can be had.
    """
    target = data_dir() / SHAKESPEARE_FILENAME
    if target.exists() and not target.is_file():
        raise CorpusUnavailableError(f"{target} exists but is not a file (a folder?); remove it or point "
                                     f"LLM_LAB_DATA at another folder")
    if target.exists():
        if sha256_of(target) == SHAKESPEARE_SHA256:
            return target
        print(f"[data] {target} fails its SHA-256 check; ignoring it and downloading a fresh copy", file=sys.stderr)
    if not download:
        raise CorpusUnavailableError(f"no verified Shakespeare corpus at {target} and download=False")
    partial = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Download next to the target, verify, then rename: a broken download never replaces a file.
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
            partial = Path(tmp.name)
            with urllib.request.urlopen(url, timeout=timeout) as response:
                tmp.write(response.read())
        if sha256_of(partial) != SHAKESPEARE_SHA256:
            raise CorpusUnavailableError(f"the file downloaded from {url} fails the SHA-256 check")
        os.replace(partial, target)
        return target
    except (OSError, ValueError) as error:  # URLError is an OSError
        raise CorpusUnavailableError(
            f"could not download the Shakespeare corpus ({error}). Put a copy of {SHAKESPEARE_FILENAME} "
            f"(sha256 {SHAKESPEARE_SHA256[:12]}...) in a folder and set LLM_LAB_DATA to that folder "
            f"(currently looking in {target.parent}), or use the offline corpus 'pydoc'."
        ) from error
    finally:
        if partial is not None and partial.exists():  # failed or unverified: leave no .part file behind
            partial.unlink()


def shakespeare_text(download: bool = True) -> str:
    return shakespeare_path(download=download).read_text(encoding="utf-8")


def load_corpus(name: str = "auto") -> tuple[str, str]:
    """Return (text, name actually used). 'auto' = Shakespeare if obtainable, else pydoc (with a message)."""
    if name not in CORPUS_NAMES:
        raise ValueError(f"corpus name must be one of {CORPUS_NAMES}, got {name!r}")
    if name == "pydoc":
        return pydoc_text(), "pydoc"
    try:
        return shakespeare_text(), "shakespeare"
    except CorpusUnavailableError as error:
        if name == "shakespeare":
            raise
        global _fallback_reported
        if not _fallback_reported:  # a demo loads its corpus several times: say it once per process
            print(f"[data] Shakespeare unavailable, using the offline pydoc corpus instead: {error}", file=sys.stderr)
            _fallback_reported = True
        return pydoc_text(), "pydoc"


class CharVocab:
    """Character-level encoding: one id per distinct character of the training text, in sorted order."""

    def __init__(self, text: str):
        if not text:
            raise ValueError("text must be non-empty to build a character vocabulary")
        self.chars = sorted(set(text))
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        unknown = set(text) - self.index.keys()
        if unknown:
            raise ValueError(f"text has characters outside the vocabulary: {sorted(unknown)[:10]}")
        return torch.tensor([self.index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.size]
        if bad:  # a negative id would silently index from the end of the list
            raise ValueError(f"ids must be in [0, {self.size}), got {bad[:10]}")
        return "".join(self.chars[i] for i in ids)


def encode_bytes(text: str) -> torch.Tensor:
    """Byte-level encoding: the UTF-8 bytes of text as ids 0..255."""
    if not text:
        return torch.empty(0, dtype=torch.long)  # frombuffer refuses an empty buffer
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def train_val_split(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """First (1 - val_fraction) of the sequence for training, the rest for validation (no shuffling:
    neighbouring text is correlated, so a contiguous split is the honest one)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(data) * (1.0 - val_fraction))
    return data[:cut], data[cut:]


def random_batch(data: torch.Tensor, batch_size: int, context_length: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the 1-D id sequence: x (B, T) and targets y (B, T) shifted by one position."""
    if data.dim() != 1:
        raise ValueError(f"data must be a 1-D id sequence, got shape {tuple(data.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if context_length < 1 or context_length >= len(data):
        raise ValueError(f"context_length must be in [1, {len(data) - 1}] for data of length {len(data)}, "
                         f"got {context_length}")
    starts = torch.randint(0, len(data) - context_length, (batch_size,), generator=generator)
    offsets = torch.arange(context_length + 1)
    windows = data[starts[:, None] + offsets]  # (B, T + 1)
    x, y = windows[:, :-1], windows[:, 1:]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
