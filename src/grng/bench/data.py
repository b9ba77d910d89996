"""Data sources of the benchmark tasks: MNIST-1D, Tiny Shakespeare, SST-2 and CIFAR-10/100.

Everything here works offline. Files are looked up in this order:

1. an explicit path given by the caller (the CLI's ``--data PATH``);
2. ``$GRNG_DATA_DIR/<file>``;
3. ``shared/data/<file>`` in any ancestor of the current working directory or of this
   package's source file (the project keeps its data in ``../shared/data`` beside the repo);
4. the download cache (``$GRNG_CACHE`` or ``~/.cache/grng``).

Only when the caller explicitly passes ``download=True`` is anything fetched from the
network (with :mod:`urllib`), into that cache. Otherwise a missing file raises
:class:`DataNotFoundError`, whose message says how to provide it. MNIST-1D is always
generated locally with the ``mnist1d`` package (never its pickle download).
"""

from __future__ import annotations

import functools
import os
import pickle
import random
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CIFAR_SPECS",
    "SST2_FILES",
    "SST2_URL",
    "TINY_SHAKESPEARE_URL",
    "CharVocab",
    "CifarArrays",
    "CifarSpec",
    "DataNotFoundError",
    "Mnist1dArrays",
    "Sst2Split",
    "augment_cifar_batch",
    "cache_dir",
    "channel_stats",
    "download_file",
    "find_data_file",
    "load_cifar",
    "load_mnist1d",
    "load_sst2",
    "load_text",
    "normalize_images",
    "read_cifar_tarball",
    "read_sst2_tsv",
    "resolve_cifar_path",
    "resolve_sst2_dir",
    "resolve_text_path",
    "split_tokens",
    "synthetic_text",
]

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"


class DataNotFoundError(FileNotFoundError):
    """A data set needed by a task is not on disk and downloading was not requested."""


# --------------------------------------------------------------------------- file lookup


def cache_dir() -> Path:
    """The download cache: ``$GRNG_CACHE`` if set, else ``~/.cache/grng`` (not created here)."""
    env = os.environ.get("GRNG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "grng"


def _ancestors(start: Path) -> list[Path]:
    start = start.resolve()
    return [start, *start.parents]


def find_data_file(name: str) -> Path | None:
    """Find ``name`` in ``$GRNG_DATA_DIR``, in ``shared/data`` beside the repo, or the cache.

    ``shared/data`` is searched for in every ancestor of the working directory and of this
    file, so the lookup works from the repo root, from a sub-folder, from CI's fresh clone
    (which has ``shared/`` beside it) and from an editable install alike.
    """
    candidates: list[Path] = []
    env = os.environ.get("GRNG_DATA_DIR")
    if env:
        candidates.append(Path(env).expanduser() / name)
    seen: set[Path] = set()
    for start in (Path.cwd(), Path(__file__).parent):
        for folder in _ancestors(start):
            if folder not in seen:
                seen.add(folder)
                candidates.append(folder / "shared" / "data" / name)
    candidates.append(cache_dir() / name)
    for path in candidates:
        if path.is_file():
            return path
    return None


def download_file(url: str, dest: Path) -> Path:
    """Fetch ``url`` into ``dest`` with urllib, atomically (temp file, then rename).

    Only ever called when a caller passes ``download=True``; the tests check that it is
    never reached when the data is present.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest


# --------------------------------------------------------------------------- MNIST-1D


@dataclass(frozen=True, eq=False)
class Mnist1dArrays:
    """MNIST-1D split into train / validation / test (float32 signals, int64 labels)."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor


@functools.lru_cache(maxsize=4)
def _mnist1d_numpy(num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D with the package's own defaults (its seed 42), cached per size."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset reseeds the *global* numpy and random generators; restore them so that
    # loading data never perturbs anyone else's randomness.
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (d["x"], d["y"], d["x_test"], d["y_test"])
    for a in arrays:
        a.setflags(write=False)  # shared by the cache: guard against in-place edits
    return arrays


def load_mnist1d(
    num_samples: int = 5000, val_fraction: float = 0.1, seed: int = 0
) -> Mnist1dArrays:
    """MNIST-1D generated locally, with a seeded validation split carved from training data.

    The data itself (and hence the train/test split, 80/20 as the package does it) uses the
    package's fixed seed, so the test set is the same for every run seed; ``seed`` only
    decides which training examples are held out for validation (learning-rate tuning).
    """
    if num_samples < 100:
        raise ValueError(f"num_samples must be at least 100, got {num_samples}")
    x, y, x_test, y_test = _mnist1d_numpy(int(num_samples))
    train_x = torch.tensor(x, dtype=torch.float32)
    train_y = torch.tensor(y, dtype=torch.int64)
    n_val = max(1, round(len(train_y) * val_fraction))
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    return Mnist1dArrays(
        train_x=train_x[tr_idx],
        train_y=train_y[tr_idx],
        val_x=train_x[val_idx],
        val_y=train_y[val_idx],
        test_x=torch.tensor(x_test, dtype=torch.float32),
        test_y=torch.tensor(y_test, dtype=torch.int64),
    )


# --------------------------------------------------------------------------- text


def resolve_text_path(data: str | os.PathLike[str] | None, download: bool) -> Path:
    """Where the Tiny Shakespeare text is: the explicit path, a known location, or downloaded.

    Raises:
        DataNotFoundError: ``data`` does not exist, or nothing was found and ``download`` is
            False.
    """
    if data is not None:
        path = Path(data).expanduser()
        if path.is_dir():
            path = path / TINY_SHAKESPEARE_FILE
        if not path.is_file():
            raise DataNotFoundError(f"text file not found: {path}")
        return path
    found = find_data_file(TINY_SHAKESPEARE_FILE)
    if found is not None:
        return found
    if download:
        return download_file(TINY_SHAKESPEARE_URL, cache_dir() / TINY_SHAKESPEARE_FILE)
    raise DataNotFoundError(
        f"Tiny Shakespeare ({TINY_SHAKESPEARE_FILE}) not found in $GRNG_DATA_DIR, in "
        f"shared/data/ beside the repository or in the cache {cache_dir()}. "
        "Pass --data PATH (a plain-text file) or --download to fetch it from "
        f"{TINY_SHAKESPEARE_URL}."
    )


def load_text(data: str | os.PathLike[str] | None = None, download: bool = False) -> str:
    """Read the character-LM corpus (UTF-8); see :func:`resolve_text_path`."""
    return resolve_text_path(data, download).read_text(encoding="utf-8")


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    """A small generated corpus for tests: random words from a tiny lexicon, with line breaks.

    Never used silently as a fallback: callers must ask for it explicitly.
    """
    lexicon = (
        "to be or not that is the question whether tis nobler in mind suffer slings "
        "and arrows of outrageous fortune KING QUEEN ROMEO JULIET thou art my lord"
    )
    words = lexicon.split(" ")
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        line = line[0].upper() + line[1:] + rng.choice(".,;!?:") + "\n"
        parts.append(line)
        size += len(line)
    return "".join(parts)[:n_chars]


@dataclass(frozen=True)
class CharVocab:
    """Character vocabulary built from a text (sorted, so it is deterministic)."""

    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """Map characters to int64 ids (KeyError on a character outside the vocabulary)."""
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


def split_tokens(
    tokens: Tensor, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
) -> tuple[Tensor, Tensor, Tensor]:
    """Split a token stream by position into contiguous train / val / test pieces."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    n = len(tokens)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return tokens[:a], tokens[a:b], tokens[b:]


# --------------------------------------------------------------------------- SST-2

#: GLUE's SST-2 archive: ``SST-2/train.tsv`` (67,349 labelled phrases), ``SST-2/dev.tsv``
#: (872 labelled sentences) and an unlabelled ``test.tsv`` (not used).
SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
#: The benchmark's three files, in a folder ``sst2/``: ``train`` and ``dev`` are GLUE's
#: training phrases split 90/10, ``test`` is GLUE's labelled validation set.
SST2_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}
SST2_FOLDER = "sst2"
#: Seed of the 90/10 train/dev split of GLUE's training phrases made by ``--download``.
SST2_SPLIT_SEED = 0


@dataclass(frozen=True)
class Sst2Split:
    """One SST-2 file: sentences (as in the file: lower-cased, tokenised with spaces) and
    binary labels (0 negative, 1 positive)."""

    sentences: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)


def read_sst2_tsv(path: str | os.PathLike[str]) -> Sst2Split:
    """Read ``sentence<TAB>label`` lines after a ``sentence<TAB>label`` header (GLUE's
    layout). Raises ``ValueError`` naming the file and line of a malformed row."""
    path = Path(path)
    sentences: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header != ["sentence", "label"]:
            raise ValueError(f"{path}: expected the header 'sentence<TAB>label', got {header}")
        for number, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            sentence, _, label = line.rpartition("\t")
            if label not in ("0", "1") or not sentence.strip():
                raise ValueError(f"{path}:{number}: expected 'sentence<TAB>0|1', got {line!r}")
            sentences.append(sentence.strip())
            labels.append(int(label))
    if not labels:
        raise ValueError(f"{path}: no examples")
    return Sst2Split(tuple(sentences), tuple(labels))


def _sst2_missing(folder: Path) -> list[str]:
    return [f for f in SST2_FILES.values() if not (folder / f).is_file()]


def resolve_sst2_dir(data: str | os.PathLike[str] | None, download: bool) -> Path:
    """The folder holding ``train.tsv``, ``dev.tsv`` and ``test.tsv``: ``data`` (that folder
    or one with an ``sst2/`` sub-folder), else ``sst2/`` in ``$GRNG_DATA_DIR``,
    ``shared/data`` or the cache (see :func:`find_data_file`), else downloaded on request
    (:func:`download_sst2`).

    Raises:
        DataNotFoundError: no complete folder was found and ``download`` is False.
    """
    if data is not None:
        path = Path(data).expanduser()
        for folder in (path, path / SST2_FOLDER):
            if folder.is_dir() and not _sst2_missing(folder):
                return folder
        missing = ", ".join(_sst2_missing(path)) if path.is_dir() else "the folder"
        raise DataNotFoundError(f"SST-2 files not found in {path} (missing {missing})")
    found = find_data_file(f"{SST2_FOLDER}/{SST2_FILES['train']}")
    if found is not None:
        lacking = _sst2_missing(found.parent)
        if lacking:
            raise DataNotFoundError(f"{found.parent} lacks {', '.join(lacking)}")
        return found.parent
    if download:
        return download_sst2(cache_dir() / SST2_FOLDER)
    raise DataNotFoundError(
        f"SST-2 ({SST2_FOLDER}/train.tsv, dev.tsv, test.tsv) not found in $GRNG_DATA_DIR, in "
        f"shared/data/ beside the repository or in the cache {cache_dir()}. Pass --data PATH "
        f"(the folder of the three files) or --download to build them from {SST2_URL}."
    )


def _write_sst2_tsv(path: Path, sentences: Sequence[str], labels: Sequence[int]) -> None:
    temporary = path.with_suffix(".tmp")
    with temporary.open("w", encoding="utf-8", newline="") as f:
        f.write("sentence\tlabel\n")
        for sentence, label in zip(sentences, labels, strict=True):
            f.write(f"{sentence}\t{label}\n")
    os.replace(temporary, path)


def download_sst2(dest: Path) -> Path:
    """Fetch GLUE's SST-2 archive (:data:`SST2_URL`) and write the benchmark's layout into
    ``dest``: GLUE's 67,349 training phrases split by a seeded permutation
    (:data:`SST2_SPLIT_SEED`) into 60,614 ``train.tsv`` / 6,735 ``dev.tsv`` (the sizes of
    the copy in ``shared/data``, though not necessarily the same phrases), and GLUE's 872
    labelled validation sentences as ``test.tsv``. Only called with ``download=True``."""
    archive = download_file(SST2_URL, cache_dir() / "SST-2.zip")
    parts: dict[str, Sst2Split] = {}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(archive) as zf:
        for name in ("train", "dev"):
            member = f"SST-2/{name}.tsv"
            try:
                target = Path(zf.extract(member, tmp))
            except KeyError:
                raise DataNotFoundError(f"{archive}: member {member} missing") from None
            parts[name] = read_sst2_tsv(target)
    glue_train = parts["train"]
    perm = torch.randperm(len(glue_train), generator=torch.Generator().manual_seed(SST2_SPLIT_SEED))
    n_dev = round(0.1 * len(glue_train))
    dest.mkdir(parents=True, exist_ok=True)
    for name, idx in (("dev", perm[:n_dev]), ("train", perm[n_dev:])):
        keep = idx.tolist()
        _write_sst2_tsv(
            dest / SST2_FILES[name],
            [glue_train.sentences[i] for i in keep],
            [glue_train.labels[i] for i in keep],
        )
    _write_sst2_tsv(dest / SST2_FILES["test"], parts["dev"].sentences, parts["dev"].labels)
    return dest


def load_sst2(
    data: str | os.PathLike[str] | None = None, download: bool = False
) -> tuple[Path, dict[str, Sst2Split]]:
    """Locate (see :func:`resolve_sst2_dir`) and read SST-2: ``(folder, {"train", "dev",
    "test"} -> Sst2Split)``."""
    folder = resolve_sst2_dir(data, download)
    return folder, {name: read_sst2_tsv(folder / f) for name, f in SST2_FILES.items()}


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class CifarSpec:
    """Layout of one official CIFAR python tarball."""

    archive: str
    folder: str
    train_members: tuple[str, ...]
    test_member: str
    label_key: bytes
    num_classes: int

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.archive}"


CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_member="test_batch",
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_members=("train",),
        test_member="test",
        label_key=b"fine_labels",
        num_classes=100,
    ),
}

CifarVariant = Literal["cifar10", "cifar100"]


@dataclass(frozen=True, eq=False)
class CifarArrays:
    """Raw CIFAR pixels (uint8, N×3×32×32) and int64 labels, as stored in the tarball."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def _spec(variant: str) -> CifarSpec:
    try:
        return CIFAR_SPECS[variant]
    except KeyError:
        raise ValueError(
            f"unknown CIFAR variant {variant!r}; valid: {sorted(CIFAR_SPECS)}"
        ) from None


def resolve_cifar_path(
    variant: CifarVariant, data: str | os.PathLike[str] | None, download: bool
) -> Path:
    """Where the CIFAR tarball is: ``data`` (the tarball or a folder holding it), a known
    location (``$GRNG_DATA_DIR``, ``shared/data``, the cache), or downloaded on request."""
    spec = _spec(variant)
    if data is not None:
        path = Path(data).expanduser()
        if path.is_dir():
            path = path / spec.archive
        if not path.is_file():
            raise DataNotFoundError(f"{variant} tarball not found: {path}")
        return path
    found = find_data_file(spec.archive)
    if found is not None:
        return found
    if download:
        return download_file(spec.url, cache_dir() / spec.archive)
    raise DataNotFoundError(
        f"{variant} ({spec.archive}) not found in $GRNG_DATA_DIR, in shared/data/ beside the "
        f"repository or in the cache {cache_dir()}. Pass --data PATH (the tarball or its "
        f"folder) or --download to fetch it from {spec.url}."
    )


def _unpickle_member(tar: tarfile.TarFile, name: str) -> dict[bytes, Any]:
    try:
        member = tar.extractfile(name)
    except KeyError:
        raise DataNotFoundError(
            f"{tar.name!r}: member {name} missing; not a CIFAR tarball?"
        ) from None
    if member is None:
        raise DataNotFoundError(f"{tar.name!r}: member {name} is not a file")
    with member:
        # The official batches are Python 2 pickles: bytes keys, hence encoding="bytes".
        obj = pickle.load(member, encoding="bytes")
    # Be lenient about str keys (re-pickled copies under Python 3).
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _batch_arrays(batch: dict[bytes, Any], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(batch[label_key], dtype=np.int64)
    if len(x) != len(y):
        raise ValueError(f"CIFAR batch has {len(x)} images but {len(y)} labels")
    return x, y


def read_cifar_tarball(path: str | os.PathLike[str], variant: CifarVariant) -> CifarArrays:
    """Read an official ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``."""
    spec = _spec(variant)
    with tarfile.open(path, "r:*") as tar:
        parts = [
            _batch_arrays(_unpickle_member(tar, f"{spec.folder}/{m}"), spec.label_key)
            for m in spec.train_members
        ]
        test_x, test_y = _batch_arrays(
            _unpickle_member(tar, f"{spec.folder}/{spec.test_member}"), spec.label_key
        )
    return CifarArrays(
        train_x=torch.from_numpy(np.concatenate([p[0] for p in parts])),
        train_y=torch.from_numpy(np.concatenate([p[1] for p in parts])),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
    )


def load_cifar(
    variant: CifarVariant, data: str | os.PathLike[str] | None = None, download: bool = False
) -> CifarArrays:
    """Locate (see :func:`resolve_cifar_path`) and read a CIFAR tarball."""
    return read_cifar_tarball(resolve_cifar_path(variant, data, download), variant)


def channel_stats(x_uint8: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (in [0, 1] units) of an N×3×H×W uint8 batch."""
    # Accumulate sums in float64 over chunks: converting all 50k images at once would
    # need over a gigabyte.
    total = torch.zeros(x_uint8.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for i in range(0, len(x_uint8), 4096):
        x = x_uint8[i : i + 4096].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    n = x_uint8.numel() // x_uint8.shape[1]
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0.0) * n / max(n - 1, 1)
    return mean.float(), var.sqrt().clamp_min(1e-6).float()


def normalize_images(x_uint8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 N×3×H×W → float32, scaled to [0, 1] then standardised per channel."""
    x = x_uint8.to(torch.float32) / 255.0
    return (x - mean.view(1, -1, 1, 1).to(x.device)) / std.view(1, -1, 1, 1).to(x.device)


def augment_cifar_batch(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop (zero padding by ``padding`` then crop back) and horizontal flip.

    ``x`` is an already normalised B×C×H×W batch, so the zero padding is the mean colour.
    Random numbers come from ``generator`` (a CPU generator) and are then moved to the
    batch's device, so the result depends only on the generator's seed, on any device.
    """
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # B×H
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # B×W
    # Flipping is folded into the column indices: read columns right-to-left.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
