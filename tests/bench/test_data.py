"""Tests of the benchmark's data: MNIST-1D, the character corpus and CIFAR, all offline."""

from __future__ import annotations

import io
import itertools
import pickle
import random
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from grng.bench import data as D
from grng.bench.tasks import TASKS, CharLMTask, DataNotFoundError, TaskData, get_task


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any network access fail loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No data anywhere: empty cache and data dir, and no shared/data found by walking up."""
    monkeypatch.setenv("GRNG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRNG_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "_ancestors", lambda start: [])
    return tmp_path


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


# --------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_shapes_classes_and_disjoint_splits() -> None:
    d = get_task("mnist1d-mlp").load(quick=True, seed=0)
    assert d.train_x.shape == (720, 40) and d.val_x.shape == (80, 40)
    assert d.test_x.shape == (200, 40)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.num_classes == 10
    for y in (d.train_y, d.val_y, d.test_y):
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert set(d.train_y.tolist()) == set(range(10))
    train, val, test = rows(d.train_x), rows(d.val_x), rows(d.test_x)
    assert len(train) == 720 and len(val) == 80
    assert not (train & val) and not (train & test) and not (val & test)


def test_mnist1d_deterministic_by_seed_and_test_set_fixed() -> None:
    task = get_task("mnist1d-cnn")
    a, b, c = (task.load(quick=True, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.val_x, c.val_x)  # seed picks the validation split...
    assert torch.equal(a.test_x, c.test_x)  # ...but never touches the test set
    assert rows(a.train_x) | rows(a.val_x) == rows(c.train_x) | rows(c.val_x)


def test_mnist1d_samples_option_and_global_rng_untouched() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    d = get_task("mnist1d-mlp").load(samples=1500, seed=0)
    assert len(d.train_y) + len(d.val_y) == 1200 and len(d.test_y) == 300
    assert np.random.rand() == expected_np and random.random() == expected_py


def test_classification_batches_are_seeded_epochs() -> None:
    task = get_task("mnist1d-mlp")
    d = task.load(quick=True, seed=0)
    take = lambda seed: list(  # noqa: E731
        itertools.islice(task.batches(d, 100, torch.Generator().manual_seed(seed)), 7)
    )
    a, b, c = take(0), take(0), take(1)
    assert all(x.shape == (100, 40) and y.shape == (100,) for x, y in a)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    # one epoch (720 examples → 7 full batches) visits distinct examples
    assert len(rows(torch.cat([x for x, _ in a]))) == 700


# --------------------------------------------------------------------------- text


def test_shakespeare_from_shared_data() -> None:
    path = D.find_data_file("tinyshakespeare.txt")
    if path is None:
        pytest.skip("shared/data/tinyshakespeare.txt is not present")
    task = get_task("shakespeare-char")
    d = task.load(quick=True)
    assert d.vocab is not None and d.num_classes == len(d.vocab)
    n = len(d.train_x) + len(d.val_x) + len(d.test_x) + 3
    assert n == 100_000
    assert abs(len(d.train_x) / n - 0.9) < 0.001 and abs(len(d.val_x) / n - 0.05) < 0.001
    text = path.read_text(encoding="utf-8")
    assert "".join(d.vocab[i] for i in d.train_x[:40].tolist()) == text[:40]


def test_shakespeare_from_explicit_file(tmp_path: Path, no_network: None) -> None:
    text = D.synthetic_text(20_000, seed=3)
    assert text == D.synthetic_text(20_000, seed=3) and len(text) == 20_000
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    task = get_task("shakespeare-char")
    d = task.load(data=str(f), download=True)  # download=True must not fetch: data is given
    assert d.vocab == tuple(sorted(set(text)))
    vocab = D.CharVocab(d.vocab)
    # x and y are the split's stream and its one-step shift; splits are positional 90/5/5
    stream = torch.cat([d.train_x, d.train_y[-1:]])
    assert vocab.decode(stream) == text[:18_000]
    assert vocab.decode(torch.cat([d.test_x, d.test_y[-1:]])) == text[19_000:]
    x, y = next(task.batches(d, 8, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (8, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_missing_text_raises_helpful_error(isolated: Path, no_network: None) -> None:
    assert issubclass(DataNotFoundError, FileNotFoundError)
    with pytest.raises(DataNotFoundError) as info:
        get_task("shakespeare-char").load(data=None, download=False)
    msg = str(info.value)
    assert "--data" in msg and "--download" in msg and "tinyshakespeare" in msg
    with pytest.raises(DataNotFoundError):
        get_task("shakespeare-char").load(data=str(isolated / "nope.txt"))


def test_data_dir_env_and_download_to_cache(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        fetched.append(url)
        return io.BytesIO(D.synthetic_text(5000, seed=1).encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    path = D.resolve_text_path(None, download=True)
    assert fetched == [D.TINY_SHAKESPEARE_URL]
    assert path == isolated / "cache" / "tinyshakespeare.txt" and path.is_file()
    # now cached: found again without fetching
    assert D.resolve_text_path(None, download=True) == path and len(fetched) == 1
    # GRNG_DATA_DIR takes precedence over the cache
    (isolated / "dd").mkdir()
    (isolated / "dd" / "tinyshakespeare.txt").write_text("abc")
    monkeypatch.setenv("GRNG_DATA_DIR", str(isolated / "dd"))
    assert D.find_data_file("tinyshakespeare.txt") == isolated / "dd" / "tinyshakespeare.txt"


def test_text_too_short_is_rejected() -> None:
    task = get_task("shakespeare-char")
    assert isinstance(task, CharLMTask)
    with pytest.raises(ValueError, match="too short"):
        task.from_text("abc" * 100)


# --------------------------------------------------------------------------- SST-2


def write_sst2(folder: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """The benchmark's SST-2 layout with made-up sentences; returns the lines written."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = {}
    for split, n in sizes.items():
        rows = [f"{split} phrase {i} , it 's \"quoted\" {rng.choice(['good', 'bad'])}\t{i % 2}"
                for i in range(n)]  # fmt: skip
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
        lines[split] = rows
    return lines


def test_sst2_tsv_reader_keeps_quotes_and_rejects_bad_rows(tmp_path: Path) -> None:
    write_sst2(tmp_path, {"train": 5})
    part = D.read_sst2_tsv(tmp_path / "train.tsv")
    assert len(part) == 5 and part.labels == (0, 1, 0, 1, 0)
    assert part.sentences[0].startswith('train phrase 0 , it \'s "quoted" ')
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\nfine\t1\nbroken\t7\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3: expected"):
        D.read_sst2_tsv(tmp_path / "bad.tsv")
    (tmp_path / "header.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match="header"):
        D.read_sst2_tsv(tmp_path / "header.tsv")


def test_sst2_from_shared_data(no_network: None) -> None:
    path = D.find_data_file("sst2/train.tsv")
    if path is None:
        pytest.skip("shared/data/sst2 is not present")
    folder, splits = D.load_sst2()
    assert folder == path.parent
    assert {k: len(v) for k, v in splits.items()} == {"train": 60614, "dev": 6735, "test": 872}
    assert set(splits["test"].labels) == {0, 1}


def test_sst2_explicit_folder_env_and_helpful_error(
    isolated: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DataNotFoundError) as info:
        D.resolve_sst2_dir(None, download=False)
    msg = str(info.value)
    assert "sst2" in msg and "--data" in msg and "--download" in msg
    write_sst2(isolated / "mine" / "sst2", {"train": 4, "dev": 2, "test": 2})
    # the folder itself, or one holding sst2/
    assert D.resolve_sst2_dir(isolated / "mine" / "sst2", False) == isolated / "mine" / "sst2"
    assert D.resolve_sst2_dir(isolated / "mine", False) == isolated / "mine" / "sst2"
    (isolated / "mine" / "sst2" / "test.tsv").unlink()
    with pytest.raises(DataNotFoundError, match=r"missing test.tsv"):
        D.resolve_sst2_dir(isolated / "mine" / "sst2", False)
    write_sst2(isolated / "dd" / "sst2", {"train": 4, "dev": 2, "test": 2})
    monkeypatch.setenv("GRNG_DATA_DIR", str(isolated / "dd"))
    assert D.resolve_sst2_dir(None, False) == isolated / "dd" / "sst2"


def test_sst2_download_builds_the_layout_from_glue(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    glue = isolated / "glue"
    write_sst2(glue, {"train": 100, "dev": 12})
    fetched: list[str] = []

    def fake_download(url: str, dest: Path) -> Path:
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest, "w") as zf:
            for name in ("train", "dev"):
                zf.write(glue / f"{name}.tsv", f"SST-2/{name}.tsv")
            zf.writestr("SST-2/test.tsv", "index\tsentence\n0\tunlabelled\n")
        return dest

    monkeypatch.setattr(D, "download_file", fake_download)
    folder = D.resolve_sst2_dir(None, download=True)
    assert fetched == [D.SST2_URL] and folder == isolated / "cache" / "sst2"
    parts = {k: D.read_sst2_tsv(folder / f) for k, f in D.SST2_FILES.items()}
    assert (len(parts["train"]), len(parts["dev"]), len(parts["test"])) == (90, 10, 12)
    original = D.read_sst2_tsv(glue / "train.tsv")
    pairs = set(zip(original.sentences, original.labels, strict=True))
    for name in ("train", "dev"):
        assert set(zip(parts[name].sentences, parts[name].labels, strict=True)) <= pairs
    assert not set(parts["train"].sentences) & set(parts["dev"].sentences)
    assert parts["test"] == D.read_sst2_tsv(glue / "dev.tsv")
    # found in the cache from now on: nothing fetched again
    assert D.resolve_sst2_dir(None, download=True) == folder and len(fetched) == 1


# --------------------------------------------------------------------------- CIFAR


def write_cifar_tarball(folder: Path, variant: str, per_batch: int, seed: int) -> dict:
    """Write a tiny tarball in the official layout; return the arrays written."""
    spec = D.CIFAR_SPECS[variant]
    rng = np.random.default_rng(seed)
    written: dict[str, tuple[np.ndarray, list[int]]] = {}
    path = folder / spec.archive
    with tarfile.open(path, "w:gz") as tar:
        for member in (*spec.train_members, spec.test_member):
            x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            y = rng.integers(0, spec.num_classes, size=per_batch).tolist()
            batch: dict[bytes, object] = {
                b"batch_label": b"fake batch",
                b"data": x,
                spec.label_key: y,
                b"filenames": [b"img%d.png" % i for i in range(per_batch)],
            }
            if variant == "cifar100":
                batch[b"coarse_labels"] = [v // 5 for v in y]
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{spec.folder}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            written[member] = (x, y)
    return written


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_tarball_round_trip(tmp_path: Path, variant: str, no_network: None) -> None:
    spec = D.CIFAR_SPECS[variant]
    per_batch = 8 if variant == "cifar10" else 40
    written = write_cifar_tarball(tmp_path, variant, per_batch, seed=0)
    for where in (tmp_path / spec.archive, tmp_path):  # the tarball, or its folder
        arrays = D.load_cifar(variant, data=str(where), download=True)  # type: ignore[arg-type]
        train_x = np.concatenate([written[m][0] for m in spec.train_members])
        train_y = [v for m in spec.train_members for v in written[m][1]]
        assert arrays.train_x.dtype == torch.uint8 and arrays.train_x.shape[1:] == (3, 32, 32)
        assert np.array_equal(arrays.train_x.reshape(-1, 3072).numpy(), train_x)
        assert arrays.train_y.tolist() == train_y
        assert np.array_equal(arrays.test_x.reshape(-1, 3072).numpy(), written[spec.test_member][0])
        assert arrays.test_y.tolist() == written[spec.test_member][1]
    # row layout is channel-major: first 1024 bytes are the red plane
    first = written[spec.train_members[0]][0][0]
    assert np.array_equal(arrays.train_x[0, 0].reshape(-1).numpy(), first[:1024])


def test_cifar_task_load_normalises_and_splits(tmp_path: Path, no_network: None) -> None:
    write_cifar_tarball(tmp_path, "cifar10", per_batch=8, seed=1)
    task = get_task("cifar10")
    d = task.load(data=str(tmp_path), download=True, seed=0)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (36, 4, 8)
    assert d.train_x.dtype == torch.float32 and d.num_classes == 10
    all_train = torch.cat([d.train_x, d.val_x])
    assert torch.allclose(all_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(all_train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert not (rows(d.train_x) & rows(d.val_x))
    x, y = next(task.batches(d, 16, torch.Generator().manual_seed(0)))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    assert task.load(data=str(tmp_path), samples=20, seed=0).train_x.shape[0] == 18


def test_missing_cifar_raises_helpful_error(isolated: Path, no_network: None) -> None:
    with pytest.raises(DataNotFoundError, match="--download"):
        get_task("cifar100").load(data=None, download=False)


def test_augmentation_shape_determinism_and_effect() -> None:
    x = torch.randn(64, 3, 32, 32)
    a = D.augment_cifar_batch(x, torch.Generator().manual_seed(0))
    b = D.augment_cifar_batch(x, torch.Generator().manual_seed(0))
    c = D.augment_cifar_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # flip only: every image is itself or its mirror, and both happen
    f = D.augment_cifar_batch(x, torch.Generator().manual_seed(0), padding=0)
    same = [torch.equal(f[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(f[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)
    # with padding, most images are shifted: neither the original nor its mirror
    shifted = [not (torch.equal(a[i], x[i]) or torch.equal(a[i], x[i].flip(-1))) for i in range(64)]
    assert sum(shifted) > 40
    # a shifted crop is a translated copy: its centre appears in the original at an offset
    i = shifted.index(True)
    img = a[i]
    found = any(
        torch.equal(img[:, 4:28, 4:28], x[i][:, 4 + dy : 28 + dy, 4 + dx : 28 + dx])
        or torch.equal(img[:, 4:28, 4:28], x[i].flip(-1)[:, 4 + dy : 28 + dy, 4 + dx : 28 + dx])
        for dy in range(-4, 5)
        for dx in range(-4, 5)
    )
    assert found


# --------------------------------------------------------------------------- registry


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        get_task("imagenet")
    names = {"mnist1d-mlp", "mnist1d-cnn", "shakespeare-char", "sst2-minilm", "cifar10",
             "cifar100"}  # fmt: skip
    for name in names:
        assert name in str(info.value)
    assert set(TASKS) == names


def test_task_metadata_and_target_logic() -> None:
    for task in TASKS.values():
        assert task.default_batch_size > 0
        if task.higher_is_better:
            assert task.metric.endswith("accuracy") and 0 < task.target < 1
            assert task.reached(task.target) and not task.reached(task.target - 0.01)
        else:
            assert task.reached(task.target) and not task.reached(task.target + 0.01)
    assert get_task("mnist1d-mlp").score({"loss": 2.0, "accuracy": 0.7}) == 0.7
    assert get_task("shakespeare-char").score({"loss": 2.0, "accuracy": 0.7}) == 2.0


def test_taskdata_split_and_to() -> None:
    t = torch.arange(4)
    d = TaskData(t, t, t + 1, t, t + 2, t, num_classes=3)
    assert torch.equal(d.split("val")[0], t + 1)
    assert torch.equal(d.to("cpu").test_x, t + 2)
    with pytest.raises(ValueError):
        d.split("dev")  # type: ignore[arg-type]
