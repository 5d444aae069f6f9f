"""Character-level text for language models: a bundled Tiny Shakespeare excerpt, a vocabulary, batches.

The bundled file is the first ~200 KB of Tiny Shakespeare (Karpathy's char-rnn corpus, text in
the public domain), cut at the end of a speech. The full 1.1 MB corpus is looked up in the shared
data folder when asked for with ``name="tinyshakespeare"``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["CharVocab", "TEXT_DATASETS", "char_lm_batches", "load_text"]

_BUNDLED = Path(__file__).resolve().parent / "corpora" / "tinyshakespeare_excerpt.txt"
_SHARED = (
    Path("../shared/data/text/tinyshakespeare.txt"),
    Path("/work/shared/data/text/tinyshakespeare.txt"),
)
TEXT_DATASETS: tuple[str, ...] = ("tinyshakespeare_excerpt", "tinyshakespeare")


def load_text(path: str | os.PathLike | None = None, name: str = "tinyshakespeare_excerpt") -> str:
    """Read a UTF-8 text file.

    Args:
        path: file to read; if given, ``name`` is ignored.
        name: ``"tinyshakespeare_excerpt"`` (default: the bundled ~200 KB excerpt) or
            ``"tinyshakespeare"`` (the full corpus, searched at
            ``../shared/data/text/tinyshakespeare.txt`` relative to the working directory, then
            ``/work/shared/data/text/tinyshakespeare.txt``).

    Raises:
        ValueError: unknown ``name``.
        FileNotFoundError: ``path`` does not exist, or the full corpus is in none of the places searched.
    """
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    if name == "tinyshakespeare_excerpt":
        return _BUNDLED.read_text(encoding="utf-8")
    if name != "tinyshakespeare":
        raise ValueError(f"unknown text {name!r}; choose from {TEXT_DATASETS} or pass path=")
    for candidate in _SHARED:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"tinyshakespeare.txt not found in {[str(p) for p in _SHARED]}; pass path= or use the bundled excerpt"
    )


class CharVocab:
    """A character vocabulary: the sorted distinct characters of a text, ids ``0 .. V-1``.

    Args:
        text: the text whose characters make the vocabulary (e.g. the whole corpus, so that
            the training and validation splits share one vocabulary).
    """

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty str")
        self.itos: list[str] = sorted(set(text))
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"CharVocab(size={len(self)})"

    def encode(self, text: str) -> Tensor:
        """``len(text)`` int64 ids. Raises ``ValueError`` on a character outside the vocabulary."""
        try:
            return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"text contains {err.args[0]!r}, which is not in the vocabulary") from None

    def decode(self, ids: Tensor | list[int]) -> str:
        """The string of a 1-D sequence of ids."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if any(not 0 <= i < len(self) for i in ids):
            raise ValueError(f"ids must be in [0, {len(self)})")
        return "".join(self.itos[i] for i in ids)


def char_lm_batches(text: str, vocab: CharVocab, seq_len: int = 35, split: str = "train") -> tuple[Tensor, Tensor]:
    """Non-overlapping next-character sequences of one split of ``text``.

    The first 90% of the characters are the training split, the last 10% the validation split.
    A split of ``L`` characters gives ``N = (L - 1) // seq_len`` sequences; the targets are the
    inputs shifted by one character (``targets[n, t] = inputs[n, t + 1]``, continuing across the
    end of a row).

    Args:
        text: the corpus.
        vocab: the vocabulary (e.g. ``CharVocab(text)``).
        seq_len: ``T``.
        split: ``"train"`` or ``"valid"``.

    Returns:
        ``(inputs, targets)``, int64 tensors of shape ``N x T``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    cut = int(0.9 * len(text))
    if split == "train":
        part = text[:cut]
    elif split == "valid":
        part = text[cut:]
    else:
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    n = (len(part) - 1) // seq_len
    if n < 1:
        raise ValueError(f"the {split} split has {len(part)} characters, too few for seq_len={seq_len}")
    ids = vocab.encode(part[: n * seq_len + 1])
    return ids[:-1].view(n, seq_len), ids[1:].view(n, seq_len)
