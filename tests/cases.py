"""The shared test kit: every optimizer variant, real model code on small tasks, data.

* ``VARIANTS`` is the one table every "every optimizer" test parametrizes over (by
  name: ``ALL``, ``ONE_EACH``); ``Variant.build`` makes the optimizer and
  ``train_step`` takes one step the way that variant needs it (RENG's exact HVP
  wants ``loss.backward(create_graph=True)``, its finite difference a closure).
* ``MODELS`` pairs real model code (an mnist1d-style MLP, a CNN with BatchNorm, a
  torchvision-style ResNet, ``nn.TransformerEncoder``, an LSTM language model, and
  tiny randomly initialised BERT and GPT-2 from ``transformers``) with a small
  learnable synthetic task. The transformers cases skip when it is not installed.
* The data helpers share one signature, ``(seed, n, *, sizes...) -> (inputs,
  targets)``, where ``seed`` is an int or a ``torch.Generator`` to draw a stream.

Import it as ``from tests.cases import ...`` (``tests`` is a package).
"""

from __future__ import annotations

import copy
import functools
import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng

# ------------------------------------------------------------------------- optimizers
#: Every curvature optimizer the kit knows; ``tests/test_reliability.py`` checks that
#: each one ``grng`` exports is known and has a variant here.
KNOWN = ("KFAC", "RING", "RENG", "RKalman")
EXPORTED = [n for n in KNOWN if hasattr(grng, n)]

#: Defaults of every variant: statistics every 2 steps, so that short tests capture.
FAST: dict[str, Any] = {"factor_update_freq": 2}


@dataclass(frozen=True)
class Variant:
    """One optimizer configuration: ``grng.<optimizer>(model, **FAST, **kwargs)``."""

    name: str
    optimizer: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: RENG's exact H∇L differentiates the gradient: ``loss.backward(create_graph=True)``.
    create_graph: bool = False
    #: RENG's finite difference re-evaluates the loss: ``optimizer.step(closure)``.
    needs_closure: bool = False

    @property
    def cls(self) -> type[grng.CurvatureOptimizer]:
        return getattr(grng, self.optimizer)  # type: ignore[no-any-return]

    def build(self, model: nn.Module, **overrides: Any) -> grng.CurvatureOptimizer:
        return self.cls(model, **{**FAST, **self.kwargs, **overrides})


# Inverses refreshed every 2 steps, so that every captured statistic reaches the update.
_VARIANTS = (
    Variant("KFAC", "KFAC", {"inverse_update_freq": 2}),  # Newton–Schulz inverses
    Variant("KFAC-eigh", "KFAC", {"inverse_update_freq": 2, "inverse": "eigh"}),
    Variant("RING", "RING", {"rho": 0.05, "inverse_update_freq": 2}),  # exact damping, eigh
    Variant(
        "RING-ns",
        "RING",
        {
            "rho": 0.05,
            "inverse_update_freq": 2,
            "inverse": "newton_schulz",
            "damping_form": "factored",
        },
    ),
    Variant("RENG-exact", "RENG", {"rho": 0.05, "inverse_update_freq": 2}, create_graph=True),
    Variant(
        "RENG-fd",
        "RENG",
        {"rho": 0.05, "inverse_update_freq": 2, "hvp": "finite_difference"},
        needs_closure=True,
    ),
    Variant("RKalman", "RKalman", {"rho": 0.05}),
)
#: name -> variant, for the optimizers ``grng`` exports.
VARIANTS: dict[str, Variant] = {v.name: v for v in _VARIANTS if v.optimizer in EXPORTED}
ALL = list(VARIANTS)
#: One variant per exported class (the cheaper tests).
ONE_EACH = [next(k for k, v in VARIANTS.items() if v.optimizer == name) for name in EXPORTED]
KRONECKER_INVERSES = [k for k, v in VARIANTS.items() if v.optimizer != "RKalman"]


def make(variant: str, model: nn.Module, **kwargs: Any) -> grng.CurvatureOptimizer:
    """``VARIANTS[variant].build(model, **kwargs)``."""
    return VARIANTS[variant].build(model, **kwargs)


# ------------------------------------------------------------------------------- steps
LossFn = Callable[[nn.Module, Any, Tensor], Tensor]


def logits_of(output: Any) -> Tensor:
    """The logits of a plain module or of a ``transformers`` model output."""
    return output if isinstance(output, Tensor) else output.logits


def cross_entropy(model: nn.Module, x: Any, y: Tensor) -> Tensor:
    """Mean cross-entropy over every target: per example, or per token for sequences."""
    logits = logits_of(model(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def mc_cross_entropy(optimizer: grng.CurvatureOptimizer) -> LossFn:
    """``cross_entropy`` that first runs the MC-Fisher backward (``fisher="mc"``)."""

    def loss_fn(model: nn.Module, x: Any, y: Tensor) -> Tensor:
        logits = logits_of(model(x))
        optimizer.backward_fisher(logits)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return loss_fn


def train_step(
    variant: str | Variant,
    model: nn.Module,
    optimizer: grng.CurvatureOptimizer,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = cross_entropy,
    chunks: int = 1,
) -> Tensor | None:
    """One step through a closure (RENG-fd needs one), ``chunks`` accumulated backwards;
    returns the loss (the sum over the chunks, detached)."""
    create_graph = (VARIANTS[variant] if isinstance(variant, str) else variant).create_graph

    def closure() -> Tensor:
        optimizer.zero_grad()
        total = torch.zeros(())
        for xs, ys in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            loss = loss_fn(model, xs, ys) / chunks
            loss.backward(create_graph=create_graph)
            total = total + loss.detach()
        return total

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward.. with create_graph")
        return optimizer.step(closure)


def run_through_refresh(
    variant: str | Variant, model: nn.Module, optimizer: grng.CurvatureOptimizer, seed: int = 100
) -> None:
    """Clean steps (``batch(seed + k)``) until a refresh step has run: skipped non-finite
    steps are reported (warned about) at the end of refresh steps only, since an ordinary
    step reads nothing back from the device. No step if the last one was a refresh step."""
    while not optimizer.is_refresh_step(optimizer.steps_taken - 1):
        train_step(variant, model, optimizer, *batch(seed + optimizer.steps_taken))


# ----------------------------------------------------------------------- state checks
def snapshot(
    model: nn.Module, optimizer: grng.CurvatureOptimizer, *, counters: bool = False
) -> tuple[Any, Any]:
    """Parameters and optimizer state (with the step counters only if ``counters``),
    deep-copied."""
    state = copy.deepcopy(optimizer.state_dict()["state"])
    if not counters:
        state.pop("counters")
    return copy.deepcopy([p.detach() for p in model.parameters()]), state


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-identical nested tensors / dicts / sequences (same dtypes), naming the path."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def curvature_tensors(optimizer: grng.CurvatureOptimizer) -> dict[str, Tensor]:
    """Every square curvature matrix in the state (factors, covariances, inverses)."""
    out: dict[str, Tensor] = {}
    for key, entry in optimizer.state.items():
        if isinstance(key, str) and key.startswith("layer:"):
            for name, value in entry.items():
                if isinstance(value, Tensor) and value.dim() == 2:
                    out[f"{key}/{name}"] = value
    return out


# -------------------------------------------------------------------------------- data
Seed = int | torch.Generator


def _generator(seed: Seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


def batch(
    seed: Seed,
    n: int = 16,
    *,
    features: int = 5,
    classes: int = 3,
    learnable: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``n`` standard-normal rows of ``features`` and class labels: uniformly random
    (exact-comparison tests), or, ``learnable``, the argmax of the first ``classes``
    features. ``dtype``: the default dtype when None."""
    g = _generator(seed)
    x = torch.randn(n, features, generator=g, dtype=dtype)
    if learnable:
        return x, x[:, :classes].argmax(1)
    return x, torch.randint(0, classes, (n,), generator=g)


def image_batch(
    seed: Seed, n: int = 16, *, channels: int = 3, size: int = 8
) -> tuple[Tensor, Tensor]:
    """``(n, channels, size, size)`` images labelled by their brightest channel."""
    x = torch.randn(n, channels, size, size, generator=_generator(seed))
    return x, x.mean((2, 3)).argmax(1)


def token_batch(
    seed: Seed, n: int = 8, *, length: int = 12, vocab: int = 16
) -> tuple[Tensor, Tensor]:
    """Counting sequences ``t_k = (start + k·stride) mod vocab`` (stride 1 or 2) and their
    next tokens: ``(n, length)`` inputs and ``(n, length)`` targets."""
    g = _generator(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 3, (n, 1), generator=g)
    tokens = (start + stride * torch.arange(length + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


@functools.lru_cache(maxsize=4)
def mnist1d(num_samples: int = 2000, seed: int = 42) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The mnist1d data set (generated locally; skips without ``mnist1d``):
    ``x, y, x_test, y_test`` with float32 inputs of 40 features and 10 classes.
    Cached: do not modify the returned tensors."""
    mnist1d_data = pytest.importorskip("mnist1d.data")
    args = mnist1d_data.get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    data = mnist1d_data.make_dataset(args)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (
        as_x(data["x"]),
        torch.tensor(data["y"]),
        as_x(data["x_test"]),
        torch.tensor(data["y_test"]),
    )


# ------------------------------------------------------------------------------ models
def mlp(
    sizes: tuple[int, ...] = (5, 8, 3),
    *,
    seed: int = 0,
    activation: type[nn.Module] = nn.Tanh,
    layer_norm: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """``Linear, activation[, LayerNorm]`` per hidden size, then a Linear head. The
    default, ``Linear(5, 8), Tanh, LayerNorm(8), Linear(8, 3)``, fits ``batch``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes[:-1]):
        layers += [nn.Linear(fan_in, fan_out), activation()]
        if layer_norm:
            layers.append(nn.LayerNorm(fan_out))
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers).to(dtype)


def tiny_mlp(*, seed: int = 0) -> nn.Sequential:
    """``Linear(4, 6), Tanh, Linear(6, 3)``: small enough for dense ground truth; fits
    ``batch(seed, n, features=4)``."""
    return mlp((4, 6, 3), seed=seed, layer_norm=False)


def mnist1d_mlp(width: int = 32, *, seed: int = 0) -> nn.Sequential:
    """The mnist1d MLP: 40 inputs, two ReLU hidden layers of ``width``, 10 classes."""
    return mlp((40, width, width, 10), seed=seed, activation=nn.ReLU, layer_norm=False)


def cnn(*, seed: int = 0, channels: int = 3, width: int = 8) -> nn.Sequential:
    """Two Conv2d + BatchNorm2d + ReLU stages, global average pooling, a Linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, channels),
    )  # fmt: skip


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two bias-free 3×3 convs with BatchNorm, in-place
    ReLUs, and an identity or ``downsample`` (1×1 conv + BatchNorm) shortcut."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout (stem, stages of BasicBlocks, average pool, fc) with a
    3×3 stem and no max-pool for tiny images; ``layers`` blocks per stage."""

    def __init__(
        self, layers: tuple[int, ...] = (1, 1), *, channels: int = 3, width: int = 8,
        num_classes: int = 3,
    ) -> None:  # fmt: skip
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.stages = nn.Sequential(
            *(
                self._make_layer(width * 2**i, blocks, stride=1 if i == 0 else 2)
                for i, blocks in enumerate(layers)
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(*, seed: int = 0, channels: int = 3, width: int = 8) -> ResNet:
    """Two stages of one BasicBlock (the second with a downsampling shortcut)."""
    torch.manual_seed(seed)
    return ResNet((1, 1), channels=channels, width=width, num_classes=channels)


class TransformerEncoderModel(nn.Module):
    """Token and position embeddings, ``nn.TransformerEncoder``, a Linear head per token."""

    def __init__(self, vocab: int, length: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(length, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.encoder(self.embed(tokens) + self.position(positions)))


def transformer_encoder(
    *, seed: int = 0, vocab: int = 16, length: int = 12, d_model: int = 16
) -> TransformerEncoderModel:
    torch.manual_seed(seed)
    return TransformerEncoderModel(vocab, length, d_model, heads=2, layers=1)


class LSTMLanguageModel(nn.Module):
    """Embedding, a one-layer ``nn.LSTM``, a Linear head per token."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


def lstm_lm(*, seed: int = 0, vocab: int = 16, hidden: int = 16) -> LSTMLanguageModel:
    torch.manual_seed(seed)
    return LSTMLanguageModel(vocab, hidden)


def bert(*, seed: int = 0, vocab: int = 16, length: int = 12, hidden: int = 16) -> nn.Module:
    """A tiny randomly initialised ``BertForMaskedLM`` (eager attention, no dropout)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=length,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(config)  # type: ignore[no-any-return]


def gpt2(*, seed: int = 0, vocab: int = 16, length: int = 12, hidden: int = 16) -> nn.Module:
    """A tiny randomly initialised ``GPT2LMHeadModel`` (transformers' ``Conv1D`` layers)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=length, n_embd=hidden, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)  # type: ignore[no-any-return]


def bert_classifier(*, seed: int = 0, vocab: int = 100, hidden: int = 64) -> nn.Module:
    """A 2-layer ``BertForSequenceClassification`` (4 labels, eager attention, the
    library's dropout defaults): the model on which grng's 0.1 defaults diverged."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=4 * hidden, max_position_embeddings=32, num_labels=4,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)  # type: ignore[no-any-return]


def classification_tokens(
    seed: Seed, n: int = 32, *, length: int = 24, vocab: int = 100
) -> tuple[Tensor, Tensor]:
    """``(n, length)`` uniform tokens labelled by their first token mod 4."""
    x = torch.randint(0, vocab, (n, length), generator=_generator(seed))
    return x, x[:, 0] % 4


@dataclass(frozen=True)
class ModelCase:
    """Real model code and a small learnable task for it: ``build(seed)`` makes the
    model, ``batch(seed)`` one batch of it, ``loss`` the loss of a batch."""

    name: str
    build: Callable[[int], nn.Module]
    batch: Callable[[Seed], tuple[Tensor, Tensor]]
    loss: LossFn = cross_entropy
    #: False where autograd has no double backward (RENG's exact HVP refuses the model).
    double_backward: bool = True


_MODELS = (
    ModelCase(
        "mnist1d-MLP",
        lambda seed: mnist1d_mlp(16, seed=seed),
        lambda seed: batch(seed, 32, features=40, classes=10, learnable=True),
    ),
    ModelCase("CNN-BatchNorm", lambda seed: cnn(seed=seed), image_batch),
    ModelCase("ResNet", lambda seed: resnet(seed=seed), image_batch),
    # nn.MultiheadAttention runs CPU's fused attention kernel: no double backward.
    ModelCase(
        "TransformerEncoder",
        lambda seed: transformer_encoder(seed=seed),
        token_batch,
        double_backward=False,
    ),
    ModelCase("LSTM-LM", lambda seed: lstm_lm(seed=seed), token_batch),
    ModelCase("BERT", lambda seed: bert(seed=seed), token_batch),
    ModelCase("GPT-2", lambda seed: gpt2(seed=seed), token_batch),
    ModelCase("BERT-classifier", lambda seed: bert_classifier(seed=seed), classification_tokens),
)
#: name -> model case (the transformers ones skip when it is not installed).
MODELS: dict[str, ModelCase] = {case.name: case for case in _MODELS}
