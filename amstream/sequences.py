"""Sequence tasks from real files: character-level text, row-sequential MNIST, the adding problem.

- :func:`load_text`: Kafka's *Metamorphosis* (``<root>/text/metamorphosis.txt``, md5-checked), the
  corpus of the ADMMiRNN reference code, as character ids over its 61 symbols; the first 90% of the
  characters train, the last 10% are held out (the char-RNN convention). :func:`text_windows` cuts a
  split into consecutive windows for ``batch_size`` parallel streams, so a stateful model
  (:mod:`amstream.models`) carries its hidden state from one window to the next.
- :func:`load_row_mnist`: MNIST (or Fashion-MNIST) read one row per time step (28 steps of 28
  pixels); ``permuted=True`` first applies one fixed random permutation to the 784 pixels, so that
  every row mixes pixels from the whole image (the "permuted" variant of sequential MNIST, read
  28 pixels per step).
- :func:`adding_problem`: the long-term-dependency task of Hochreiter and Schmidhuber (1997), in
  the form of Le, Jaitly and Hinton (2015): each step holds a value drawn uniformly from [0, 1] and a
  marker; exactly two steps are marked, one in each half of the sequence, and the target is the sum
  of their values. Predicting 1 always scores the variance of that sum, 1/6 = 0.167. Its inputs are
  generated, by definition, from a seed.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import torch

from .data import DataFileCorrupt, Dataset, _check_md5, _require, data_dir, load_fashion_mnist, load_mnist

__all__ = ["CharCorpus", "load_text", "text_windows", "n_windows", "text_loss", "load_row_mnist", "adding_problem",
           "TEXT_FILE", "ADDING_TRIVIAL_MSE"]

TEXT_FILE = "text/metamorphosis.txt"
_TEXT_MD5 = "7237b0cf232174ed58b25dd4e4b8a4ae"
TEXT_TRAIN_FRACTION = 0.9
#: the mean squared error of always predicting the mean target (1) on the adding problem: Var(U1 + U2)
ADDING_TRIVIAL_MSE = 1.0 / 6.0


@dataclasses.dataclass(frozen=True)
class CharCorpus:
    """A text as character ids.

    Attributes:
        ids: the characters' ids, int64, shape (N,).
        vocab: the characters, index = id (the sorted symbols of the whole corpus, so that both
            splits share one vocabulary).
    """

    ids: torch.Tensor
    vocab: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def encode(self, text: str) -> torch.Tensor:
        index = {ch: i for i, ch in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters outside the vocabulary: {unknown!r}")
        return torch.tensor([index[ch] for ch in text], dtype=torch.long)

    def unigram_entropy(self) -> float:
        """The entropy of the character frequencies, in nats: the loss of a model that ignores the
        context (the line a sequence model must beat)."""
        p = torch.bincount(self.ids, minlength=self.vocab_size).double() / len(self)
        p = p[p > 0]
        return float(-(p * p.log()).sum())


def load_text(split: str = "train", root: str | os.PathLike | None = None) -> CharCorpus:
    """The Metamorphosis corpus as character ids: ``"train"`` (first 90%), ``"test"`` (last 10%) or
    ``"all"``."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    base = data_dir(root)
    path = base / TEXT_FILE
    _require(path, f"<root>/{TEXT_FILE}", base)
    _check_md5(path, _TEXT_MD5)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFileCorrupt(f"{path}: not UTF-8 text ({err})") from None
    vocab = tuple(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    cut = int(len(ids) * TEXT_TRAIN_FRACTION)
    ids = {"train": ids[:cut], "test": ids[cut:], "all": ids}[split]
    return CharCorpus(ids, vocab)


def text_windows(corpus: CharCorpus | torch.Tensor, window: int, batch_size: int = 1,
                 start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ``(inputs, next characters)`` windows, each ``(batch_size, window)`` long ids.

    The text is cut into ``batch_size`` contiguous streams of equal length (the rest dropped);
    window ``k`` holds characters ``[k*window, (k+1)*window)`` of every stream and its targets are
    the same positions shifted by one. ``start`` skips that many windows (resuming a stream).
    """
    ids = corpus.ids if isinstance(corpus, CharCorpus) else corpus
    if int(window) < 1 or int(batch_size) < 1:
        raise ValueError(f"window and batch_size must be >= 1, got {window} and {batch_size}")
    per_stream = (len(ids) - 1) // batch_size
    if per_stream < window:
        raise ValueError(f"a text of {len(ids)} characters cut into {batch_size} streams leaves "
                         f"{per_stream} per stream, fewer than one window of {window}")
    streams = ids[:batch_size * per_stream + 1]
    x = streams[:-1].view(batch_size, per_stream)
    y = streams[1:batch_size * per_stream + 1].view(batch_size, per_stream)
    for k in range(int(start), per_stream // window):
        yield x[:, k * window:(k + 1) * window], y[:, k * window:(k + 1) * window]


def n_windows(corpus: CharCorpus | torch.Tensor, window: int, batch_size: int = 1) -> int:
    """How many windows :func:`text_windows` yields."""
    ids = corpus.ids if isinstance(corpus, CharCorpus) else corpus
    return ((len(ids) - 1) // batch_size) // window


def load_row_mnist(split: str = "train", root: str | os.PathLike | None = None, *, permuted: bool = False,
                   seed: int = 0, dataset: str = "mnist") -> Dataset:
    """MNIST (or ``dataset="fashion-mnist"``) as sequences ``(N, 28 steps, 28 pixels)``, standardized.

    ``permuted``: one permutation of the 784 pixels, drawn from ``seed`` (the same for both splits).
    """
    loaders = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
    if dataset not in loaders:
        raise ValueError(f"dataset must be one of {sorted(loaders)}, got {dataset!r}")
    ds = loaders[dataset](split, root)
    flat = ds.x.reshape(len(ds), 784)
    if permuted:
        flat = flat[:, torch.randperm(784, generator=torch.Generator().manual_seed(seed))]
    name = ("permuted-" if permuted else "") + f"row-{dataset}"
    return dataclasses.replace(ds, x=flat.reshape(len(ds), 28, 28).contiguous(), name=name)


def adding_problem(n: int, length: int, seed: int = 0) -> Dataset:
    """``n`` sequences of the adding problem of ``length`` steps: inputs ``(n, length, 2)`` (value,
    marker), targets ``(n, 1)`` float (the sum of the two marked values)."""
    if int(n) < 1 or int(length) < 2:
        raise ValueError(f"need n >= 1 sequences of length >= 2, got n={n}, length={length}")
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, length, generator=g)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=g)
    second = torch.randint(half, length, (n,), generator=g)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = (values[rows, first] + values[rows, second]).unsqueeze(1)
    x = torch.stack((values, markers), dim=2)
    return Dataset(x=x, y=y, n_classes=0, name=f"adding-{length}", classes=())


@torch.no_grad()
def text_loss(model, corpus: CharCorpus | torch.Tensor, window: int = 100) -> float:
    """Next-character cross-entropy of a many-to-many token model over a whole text, in nats per
    character: one stream, the hidden state carried from window to window, the model unchanged (its
    own carried state and mode are left as they were)."""
    ids = corpus.ids if isinstance(corpus, CharCorpus) else corpus
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    device = next(model.parameters()).device
    try:
        for x, y in text_windows(ids, window, batch_size=1):
            out, state = model.run(x.to(device), state)
            total += float(torch.nn.functional.cross_entropy(out, y.to(device), reduction="sum"))
            count += y.numel()
        rest = (len(ids) - 1) % window  # the characters after the last full window
        if rest:
            x, y = ids[-rest - 1:-1].view(1, -1), ids[-rest:].view(1, -1)
            out, state = model.run(x.to(device), state)
            total += float(torch.nn.functional.cross_entropy(out, y.to(device), reduction="sum"))
            count += rest
    finally:
        model.train(was_training)
    return total / count
