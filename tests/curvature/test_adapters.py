"""Every built-in layer adapter against dense float64 ground truth (issue #11, item 6).

The references are computed from first principles, independently of the capture
hooks: the inputs of each block, and the gradients of the loss with respect to the
block's output *tensor*, obtained by re-implementing the layer with plain tensor
ops on the module's own parameters and back-propagating the same loss (each test
checks that the two losses agree). With the normalisation of
:mod:`grng.curvature.capture` (mean loss, ``M = n``)::

    A = Σ a aᵀ / rows             (a with a trailing 1 when the block has a bias)
    G = n Σ ĝ ĝᵀ,  ĝ = ∂L/∂s      (n: rows of a Linear-like call, the batch of a conv)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from grng.curvature import CurvatureCapture, FactorEstimate, find_kronecker_layers
from grng.curvature.layers import _BY_TYPE, KroneckerLayer, adapter_for

pytestmark = pytest.mark.usefixtures("float64")

TIGHT = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ helpers
def _estimates(
    model: nn.Module, loss_fn: Callable[[], Tensor]
) -> tuple[list[KroneckerLayer], dict[str, FactorEstimate]]:
    """The blocks of ``model`` and the factors captured from one backward of ``loss_fn()``."""
    layers = find_kronecker_layers(model, {p for p in model.parameters() if p.requires_grad})
    capture = CurvatureCapture(model, layers)
    capture.armed = True
    loss_fn().backward()
    estimates = capture.estimates()
    capture.remove()
    return layers, estimates


def _activation_factor(rows: Tensor, bias: bool) -> Tensor:
    """``Σ a aᵀ / rows`` of the rows ``(..., d)``, with a column of ones for a bias."""
    rows = rows.detach().reshape(-1, rows.shape[-1])
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], 1)
    return rows.T @ rows / rows.shape[0]


def _gradient_factor(output_grads: Tensor, examples: int) -> Tensor:
    """``n Σ ĝ ĝᵀ`` of the output gradients ``(..., d)`` of a mean loss."""
    rows = output_grads.reshape(-1, output_grads.shape[-1])
    return examples * rows.T @ rows


def _check(estimate: FactorEstimate, a: Tensor, g: Tensor) -> None:
    torch.testing.assert_close(estimate.activation_factor, a, **TIGHT)
    torch.testing.assert_close(estimate.gradient_factor, g, **TIGHT)


# ------------------------------------------------------------------ Linear
def test_linear_on_sequences_every_position_is_an_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(3, 6, 4), torch.randint(0, 3, (3, 6))

    def loss_of(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1))

    _, est = _estimates(model, lambda: loss_of(model(x)))

    (w0, b0), (w1, b1) = (model[0].weight, model[0].bias), (model[2].weight, model[2].bias)
    s0 = x @ w0.T + b0
    h = torch.tanh(s0)
    s1 = h @ w1.T + b1
    loss = loss_of(s1)
    torch.testing.assert_close(loss, loss_of(model(x)), **TIGHT)
    g0, g1 = torch.autograd.grad(loss, [s0, s1])
    _check(est["0"], _activation_factor(x, True), _gradient_factor(g0, 18))
    _check(est["2"], _activation_factor(h, True), _gradient_factor(g1, 18))


# ------------------------------------------------------------------ convolutions
def _patches(x: Tensor, conv: nn.Conv1d | nn.Conv2d) -> tuple[Tensor, tuple[int, ...]]:
    """Receptive fields of a zero-padded conv input by strided slicing (no ``F.unfold``):
    rows ``(N·positions, C·k)`` ordered example-major, and the output's spatial shape."""
    if isinstance(conv, nn.Conv1d):  # a 1-d convolution is a 2-d one of height 1
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = (
            (1, *conv.kernel_size),
            (1, *conv.stride),
            (0, *conv.padding),
            (1, *conv.dilation),
        )
    else:
        kernel, stride, padding, dilation = (
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
        )
    assert not isinstance(padding, str)
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out = [(xp.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(2)]
    fields = [
        xp[
            :,
            :,
            i * dilation[0] : i * dilation[0] + stride[0] * (out[0] - 1) + 1 : stride[0],
            j * dilation[1] : j * dilation[1] + stride[1] * (out[1] - 1) + 1 : stride[1],
        ]
        for i in range(kernel[0])
        for j in range(kernel[1])
    ]
    stacked = torch.stack(fields, 2)  # (N, C, k, H_out, W_out): (c, k) is the weight's order
    rows = stacked.permute(0, 3, 4, 1, 2).reshape(-1, stacked.shape[1] * stacked.shape[2])
    spatial = (out[1],) if isinstance(conv, nn.Conv1d) else tuple(out)
    return rows, spatial


@pytest.mark.parametrize(
    "make_conv",
    [
        lambda: nn.Conv2d(3, 4, kernel_size=(3, 2), stride=(2, 1), padding=1),
        lambda: nn.Conv2d(4, 6, kernel_size=3, padding=(1, 2), dilation=(1, 2), groups=2),
        lambda: nn.Conv2d(4, 4, kernel_size=2, groups=4, bias=False),
        lambda: nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1, dilation=2),
        lambda: nn.Conv1d(6, 3, kernel_size=2, padding=1, groups=3),
    ],
    ids=["conv2d", "conv2d_groups2", "conv2d_depthwise_nobias", "conv1d", "conv1d_groups3"],
)
def test_conv_block_per_group_follows_kfc(make_conv):
    """Group j: A from the patches of its own input channels, G from its own output
    channels' gradients summed over positions, averaged over the batch (KFC)."""
    torch.manual_seed(1)
    conv = make_conv()
    n = 3
    x = torch.randn(n, conv.in_channels, *((5, 6) if isinstance(conv, nn.Conv2d) else (9,)))
    with torch.no_grad():
        width = conv(x).flatten(1).shape[1]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(width, 3))
    y = torch.randint(0, 3, (n,))
    layers, est = _estimates(model, lambda: F.cross_entropy(model(x), y))

    convolve = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    out = convolve(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    loss = F.cross_entropy(model[1:](out), y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y), **TIGHT)
    grad_out, grad_weight = torch.autograd.grad(loss, [out, conv.weight])
    bias = conv.bias is not None
    groups = conv.groups
    c_in, c_out = conv.in_channels // groups, conv.out_channels // groups
    expected = ["0"] if groups == 1 else [f"0.group{j}" for j in range(groups)]
    assert [layer.name for layer in layers if layer.module is conv] == expected
    for j, name in enumerate(expected):
        patches, spatial = _patches(x[:, j * c_in : (j + 1) * c_in], conv)
        assert tuple(grad_out.shape[2:]) == spatial
        g_rows = grad_out[:, j * c_out : (j + 1) * c_out].flatten(2).transpose(1, 2)
        g_rows = g_rows.reshape(-1, c_out)
        # The reference geometry itself: Σ g aᵀ is this group's rows of the gradient.
        weight_grad = g_rows.T @ patches
        own_rows = grad_weight[j * c_out : (j + 1) * c_out]
        torch.testing.assert_close(weight_grad.reshape(own_rows.shape), own_rows, **TIGHT)
        _check(est[name], _activation_factor(patches, bias), _gradient_factor(g_rows, n))


# ------------------------------------------------------------------ attention
def _attention_reference(
    mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor
) -> tuple[dict[str, tuple[Tensor, Tensor]], Callable[[Tensor], Tensor]]:
    """``mha``'s forward with plain tensor ops on its weights.

    Returns, per block (``q``, ``k``, ``v``, ``out``), its input and its output
    tensor (sequence-first), and a function that finishes the forward from the
    output projection's result (to apply the loss to)."""
    if mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, heads = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.chunk(3)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    no_bias = mha.in_proj_bias is None
    biases = (0.0, 0.0, 0.0) if no_bias else mha.in_proj_bias.chunk(3)
    inputs = (query, key, value)
    q, k, v = (x @ w.T + b for x, w, b in zip(inputs, weights, biases, strict=True))

    def split(t: Tensor) -> Tensor:  # (L, N, E) -> (N, heads, L, E / heads)
        return t.reshape(t.shape[0], t.shape[1], heads, e // heads).permute(1, 2, 0, 3)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(e // heads)
    context = (scores.softmax(-1) @ split(v)).permute(2, 0, 1, 3).reshape(q.shape)
    bias_out = 0.0 if mha.out_proj.bias is None else mha.out_proj.bias
    out = context @ mha.out_proj.weight.T + bias_out
    blocks = {"q": (query, q), "k": (key, k), "v": (value, v), "out": (context, out)}
    return blocks, (lambda s: s.transpose(0, 1)) if mha.batch_first else (lambda s: s)


ATTENTION_CASES = {
    # name: (batch_first, kdim, vdim, which inputs are the same tensor)
    "self": (True, None, None, "qkv"),
    "self_seq_first": (False, None, None, "qkv"),
    "cross_kv_shared": (True, None, None, "kv"),
    "cross_all_different": (False, None, None, ""),
    "kdim_vdim": (True, 3, 5, ""),
    "kdim_vdim_kv_shared": (False, 3, 3, "kv"),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_multihead_attention_blocks_match_the_reimplemented_projections(case, bias):
    """q/k/v: A from the query/key/value inputs, G from the gradients of the projected
    q/k/v; out_proj: A from the attention context, G from the output's gradients."""
    batch_first, kdim, vdim, same = ATTENTION_CASES[case]
    torch.manual_seed(2)
    e, n, tgt, src = 4, 3, 5, 5 if same == "qkv" else 6
    mha = nn.MultiheadAttention(e, 2, bias=bias, batch_first=batch_first, kdim=kdim, vdim=vdim)

    def shaped(length: int, dim: int) -> Tensor:
        return torch.randn((n, length, dim) if batch_first else (length, n, dim))

    query = shaped(tgt, e)
    key = query if same == "qkv" else shaped(src, kdim or e)
    value = key if "kv" in same else shaped(src, vdim or e)
    target = torch.randn_like(query)

    def module_loss() -> Tensor:
        # need_weights=False takes the scaled_dot_product_attention path, True the bmm one.
        out, _ = mha(query, key, value, need_weights=case.endswith("different"))
        return F.mse_loss(out, target)

    layers, est = _estimates(mha, module_loss)
    blocks, finish = _attention_reference(mha, query, key, value)
    loss = F.mse_loss(finish(blocks["out"][1]), target)
    torch.testing.assert_close(loss, module_loss(), **TIGHT)

    assert [layer.part for layer in layers] == ["q", "k", "v", "out"]
    outputs = [output for _, output in blocks.values()]
    grads = dict(zip(blocks, torch.autograd.grad(loss, outputs), strict=True))
    for layer in layers:
        inputs, output = blocks[layer.part]
        rows = output.shape[0] * output.shape[1]
        assert (layer.bias is not None) == bias
        _check(
            est[layer.name],
            _activation_factor(inputs, bias),
            _gradient_factor(grads[layer.part], rows),
        )


# ------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_has_a_diagonal_token_factor_and_a_dense_gradient_factor(padding_idx):
    """A = diag(token counts) / tokens (the padding token counts as a one-hot row like
    any other: its column of V is always zero, so its update is zero whatever A holds);
    G = tokens · Σ ĝ ĝᵀ over the gradients of the looked-up vectors."""
    torch.manual_seed(3)
    embed, head = nn.Embedding(7, 4, padding_idx=padding_idx), nn.Linear(4, 7)
    model = nn.Sequential(embed, nn.Tanh(), head)
    tokens = torch.tensor([[0, 1, 1, 3], [3, 3, 0, 6], [5, 1, 0, 0]])
    targets = torch.randint(0, 7, tokens.shape)

    def loss_of(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))

    layers, est = _estimates(model, lambda: loss_of(model(tokens)))
    block = layers[0]
    assert (block.name, block.activation_shape, block.gradient_shape) == ("0", (7,), (4, 4))
    looked_up = embed.weight[tokens]
    loss = loss_of(model[1:](looked_up))
    torch.testing.assert_close(loss, loss_of(model(tokens)), **TIGHT)
    (grad,) = torch.autograd.grad(loss, looked_up)
    counts = torch.zeros(7)
    for t in tokens.reshape(-1).tolist():
        counts[t] += 1
    _check(est["0"], counts / 12, _gradient_factor(grad, 12))


# ------------------------------------------------------------------ transformers' Conv1D
class Conv1D(nn.Module):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` stored ``(nx, nf)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


def _real_transformers_conv1d(nf: int, nx: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    module = pytorch_utils.Conv1D(nf, nx)
    with torch.no_grad():
        module.bias.normal_(0.0, 0.1)  # initialised to zero
    return module


@pytest.mark.parametrize("make", [Conv1D, _real_transformers_conv1d], ids=["local", "transformers"])
def test_transformers_conv1d_is_a_linear_with_a_transposed_weight(make):
    torch.manual_seed(4)
    conv = make(5, 3)
    assert conv.weight.shape == (3, 5)
    model = nn.Sequential(conv, nn.Tanh(), nn.Linear(5, 2))
    x, target = torch.randn(2, 4, 3), torch.randn(2, 4, 2)
    layers, est = _estimates(model, lambda: F.mse_loss(model(x), target))
    block = layers[0]
    assert (block.name, block.activation_dim, block.gradient_dim) == ("0", 4, 5)
    s = x @ conv.weight + conv.bias
    loss = F.mse_loss(model[1:](s), target)
    torch.testing.assert_close(loss, F.mse_loss(model(x), target), **TIGHT)
    (grad,) = torch.autograd.grad(loss, s)
    _check(est["0"], _activation_factor(x, True), _gradient_factor(grad, 8))


# ------------------------------------------------------------------ the update
class _AttentionNet(nn.Module):
    """Embedding (padding token 0) → self-attention (packed in_proj) → Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4, padding_idx=0)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 9)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(h + a))


def _attention_net_step(optimizer_cls: type[grng.KFAC], **kwargs: object):
    """One step of ``optimizer_cls`` on :class:`_AttentionNet`: the optimizer, and per
    parameter name the gradient and the change ``before − after``."""
    torch.manual_seed(5)
    model = _AttentionNet()
    tokens = torch.tensor([[1, 2, 2, 5, 0], [7, 3, 8, 0, 0], [4, 4, 6, 1, 2]])
    targets = torch.randint(0, 9, tokens.shape)
    optimizer = optimizer_cls(
        model, lr=1.0, momentum=0.0, kl_clip=None, factor_update_freq=1, inverse_update_freq=1,
        **kwargs,
    )  # fmt: skip
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    optimizer.zero_grad()
    F.cross_entropy(model(tokens).reshape(-1, 9), targets.reshape(-1)).backward()
    grads = {n: p.grad.clone() for n, p in named.items()}
    optimizer.step()
    change = {n: before[n] - p.detach() for n, p in named.items()}
    return optimizer, grads, change


def _blocks_by_hand(grads: dict[str, Tensor]) -> dict[str, tuple[Tensor, Callable]]:
    """Per block of :class:`_AttentionNet`: ``V`` read from the gradients by hand, and a
    function that writes a ``V``-shaped update into per-parameter tensors."""
    e = 4
    out: dict[str, tuple[Tensor, Callable]] = {}

    def rows_writer(weight: str, bias: str | None, rows: slice) -> Callable:
        def write(delta: Tensor, into: dict[str, Tensor]) -> None:
            into.setdefault(weight, torch.zeros_like(grads[weight]))[rows] = delta[:, :-1]
            if bias is not None:
                into.setdefault(bias, torch.zeros_like(grads[bias]))[rows] = delta[:, -1]

        return write

    weight, bias = "attn.in_proj_weight", "attn.in_proj_bias"
    for i, part in enumerate("qkv"):
        rows = slice(i * e, (i + 1) * e)
        v = torch.cat([grads[weight][rows], grads[bias][rows, None]], 1)
        out[f"attn.in_proj.{part}"] = (v, rows_writer(weight, bias, rows))
    for name, weight, bias in (
        ("attn.out_proj", "attn.out_proj.weight", "attn.out_proj.bias"),
        ("head", "head.weight", "head.bias"),
    ):
        v = torch.cat([grads[weight], grads[bias][:, None]], 1)
        out[name] = (v, rows_writer(weight, bias, slice(None)))

    def write_embedding(delta: Tensor, into: dict[str, Tensor]) -> None:
        into["embed.weight"] = delta.T  # V = Wᵀ

    out["embed"] = (grads["embed.weight"].T, write_embedding)
    return out


def _dense(factor: Tensor) -> Tensor:
    return torch.diag(factor) if factor.dim() == 1 else factor


@pytest.mark.parametrize("form", ["ring_exact", "kfac_factored"])
def test_first_step_on_attention_embedding_linear_equals_the_dense_solve(form):
    """RING (exact): vec Δ = (G ⊗ A + γI)⁻¹ vec V with γ = λ + ρ‖g‖²; KFAC (factored,
    eigh): vec Δ = ((G + √λ/π I) ⊗ (A + π√λ I))⁻¹ vec V, π² = (tr A/d_A)/(tr G/d_G).
    A diagonal side is diag(a). The q/k/v pieces land in their rows of in_proj."""
    lam, rho = 0.05, 0.3
    if form == "ring_exact":
        optimizer, grads, change = _attention_net_step(
            grng.RING, rho=rho, damping=lam, damping_form="exact"
        )
    else:
        optimizer, grads, change = _attention_net_step(grng.KFAC, damping=lam, inverse="eigh")
    by_hand = _blocks_by_hand(grads)
    assert sorted(layer.name for layer in optimizer.layers) == sorted(by_hand)
    assert optimizer.state["layer:embed"]["activation_factor"].dim() == 1
    gamma = lam + rho * sum(g.pow(2).sum() for g in grads.values())  # RING's; KFAC's is λ
    expected: dict[str, Tensor] = {}
    for name, (v, write) in by_hand.items():
        state = optimizer.state[f"layer:{name}"]
        a, g = _dense(state["activation_factor"]), _dense(state["gradient_factor"])
        eye_a, eye_g = torch.eye(a.shape[0]), torch.eye(g.shape[0])
        if form == "ring_exact":
            matrix = torch.kron(g, a) + gamma * torch.eye(v.numel())
        else:
            pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
            matrix = torch.kron(g + lam**0.5 / pi * eye_g, a + pi * lam**0.5 * eye_a)
        delta = torch.linalg.solve(matrix, v.reshape(-1)).reshape(v.shape)
        write(delta, expected)
    assert sorted(expected) == sorted(change)
    for name, value in expected.items():
        torch.testing.assert_close(change[name], value, rtol=1e-9, atol=1e-12, msg=name)
    assert change["embed.weight"][0].abs().max() == 0  # the padding row never moves


# ------------------------------------------------------------------ deep linear networks
def _deep_linear_net(bias: bool) -> nn.Sequential:
    torch.manual_seed(6)
    return nn.Sequential(*(nn.Linear(i, o, bias=bias) for i, o in ((3, 4), (4, 5), (5, 2))))


def _exact_ggn_blocks(model: nn.Sequential, x: Tensor) -> list[Tensor]:
    """Diagonal blocks ``Jᵀ J`` of the GGN of ``½‖f(x) − y‖²`` (the loss's Hessian in f
    is I), one per layer, w.r.t. its ``[W | b]`` read row-major, by dense Jacobians."""
    blocks = []
    for i, layer in enumerate(model):
        assert isinstance(layer, nn.Linear)
        flat = layer.weight.detach() if layer.bias is None else torch.cat(
            [layer.weight.detach(), layer.bias.detach()[:, None]], 1
        )  # fmt: skip

        def f(theta: Tensor, i: int = i, shape: torch.Size = flat.shape) -> Tensor:
            h = x
            for j, other in enumerate(model):
                if j == i:
                    wb = theta.reshape(shape)
                    h = h @ wb[:, : other.in_features].T
                    h = h + wb[:, -1] if other.bias is not None else h
                else:
                    h = other(h)
            return h.reshape(-1)

        jac = torch.autograd.functional.jacobian(f, flat.reshape(-1))  # (outputs, params)
        blocks.append(jac.T @ jac)
    return blocks


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_kfac_equals_the_exact_ggn_for_a_deep_linear_network_on_one_point(bias):
    """curvlinops' classic check. For one input x of a deep linear network, layer l's
    Jacobian is ``∂f/∂vec[W|b] = B ⊗ aᵀ`` (B = ∂f/∂s_l, a = [input; 1]), so its GGN block
    ``Jᵀ J = (Bᵀ B) ⊗ (a aᵀ)`` *is* a Kronecker product, and K-FAC is exact when
    ``A = a aᵀ`` and ``G = Bᵀ B = Σ_j (∂f_j/∂s)(∂f_j/∂s)ᵀ``.

    That G is the Fisher of the Gaussian likelihood: ``E[g gᵀ]`` for ``g = Bᵀ ε``,
    ``ε ~ N(0, I)``, since ``E[ε εᵀ] = I``. Deterministically, the k = dim f labels
    ``y_j = f(x) − √k e_j`` have exactly that second moment (``(1/k) Σ_j k e_j e_jᵀ = I``),
    so the library's ordinary (empirical) capture on k copies of x with these labels,
    under the mean loss ``(1/k) Σ_j ½‖f(x) − y_j‖²``, must give exactly G ⊗ A. The
    Monte-Carlo Fisher (``backward_fisher``, Gaussian) must agree in expectation.
    """
    model = _deep_linear_net(bias)
    x = torch.randn(1, 3)
    dense = _exact_ggn_blocks(model, x)

    k = model[-1].out_features
    optimizer = grng.KFAC(model, factor_update_freq=1, inverse_update_freq=1)
    copies = x.expand(k, 3)
    with torch.no_grad():
        labels = model(copies) - k**0.5 * torch.eye(k)
    optimizer.zero_grad()
    (0.5 * (model(copies) - labels).pow(2).sum(1).mean()).backward()
    optimizer.step()
    for i, block in enumerate(dense):
        state = optimizer.state[f"layer:{i}"]
        kron = torch.kron(state["gradient_factor"], state["activation_factor"])
        torch.testing.assert_close(kron, block, rtol=1e-10, atol=1e-12)

    model = _deep_linear_net(bias)
    mc = grng.KFAC(model, fisher="mc", factor_update_freq=1, inverse_update_freq=1)
    mc._fisher_generator = torch.Generator().manual_seed(0)
    out = model(x)
    for _ in range(2000):  # passes since the last clear are averaged
        mc.backward_fisher(out, "gaussian")
    estimates = mc.capture.estimates()
    for i, block in enumerate(dense):
        kron = torch.kron(estimates[str(i)].gradient_factor, estimates[str(i)].activation_factor)
        error = torch.linalg.matrix_norm(kron - block) / torch.linalg.matrix_norm(block)
        assert error < 0.1, f"layer {i}: relative error {float(error):.3f}"


# ------------------------------------------------------------------ register_layer
class Scale(nn.Module):
    """``y = x Wᵀ`` with ``W`` of shape ``(out, in)``: a Linear the library does not know."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T


@pytest.fixture
def registry() -> Iterator[None]:
    """Restores the (global) table of adapters by type after the test."""
    saved = dict(_BY_TYPE)
    yield
    _BY_TYPE.clear()
    _BY_TYPE.update(saved)


@pytest.mark.usefixtures("registry")
def test_register_layer_gives_a_custom_module_the_factors_of_a_linear():
    torch.manual_seed(7)
    scale, linear = Scale(3, 4), nn.Linear(3, 4, bias=False)
    linear.weight = nn.Parameter(scale.weight.detach().clone())
    x, y = torch.randn(2, 5, 3), torch.randint(0, 4, (2, 5))

    def factors(layer: nn.Module) -> FactorEstimate:
        torch.manual_seed(8)  # the same head for both
        model = nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 4))
        layers, est = _estimates(
            model, lambda: F.cross_entropy(model(x).reshape(-1, 4), y.reshape(-1))
        )
        assert [block.name for block in layers] == ["0", "2"]
        return est["0"]

    assert adapter_for(scale) is None
    adapter = grng.LayerAdapter()
    grng.register_layer(Scale, adapter)
    assert adapter_for(scale) is adapter
    reference = factors(linear)
    custom = factors(scale)
    torch.testing.assert_close(custom.activation_factor, reference.activation_factor, **TIGHT)
    torch.testing.assert_close(custom.gradient_factor, reference.gradient_factor, **TIGHT)

    replacement = grng.LayerAdapter()
    grng.register_layer(Scale, replacement)
    assert adapter_for(scale) is replacement
    blocks = find_kronecker_layers(scale, {scale.weight})
    assert [block.adapter for block in blocks] == [replacement]

    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        grng.register_layer(int, grng.LayerAdapter())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LayerAdapter"):
        grng.register_layer(Scale, object())  # type: ignore[arg-type]
    assert adapter_for(scale) is replacement  # a refused registration changes nothing


# ------------------------------------------------------------------ issue #11: done when
class _TinyLM(nn.Module):
    def __init__(self, vocab: int = 16, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)))


class _NoBlocks(grng.LayerAdapter):
    """An adapter without blocks: the module's own parameters get no Kronecker block."""

    def blocks(self, name: str, module: nn.Module) -> list[KroneckerLayer]:
        return []


def _step_to_gradient_ratios(model: nn.Module, steps: int = 20) -> dict[str, float]:
    """``|Δθ| / |g|`` of every weight matrix on the last of ``steps`` KFAC steps."""
    optimizer = grng.KFAC(model, damping=1e-5, factor_update_freq=1, inverse_update_freq=1)
    tokens = torch.randint(0, 16, (4, 7), generator=torch.Generator().manual_seed(1))
    named = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, 16), tokens[:, 1:].reshape(-1)).backward()
        before = {n: p.detach().clone() for n, p in named.items()}
        grads = {n: p.grad.norm() for n, p in named.items()}
        optimizer.step()
    return {n: float((before[n] - p.detach()).norm() / grads[n]) for n, p in named.items()}


def _out_proj_against_the_median(ratios: dict[str, float]) -> float:
    others = torch.tensor([r for n, r in ratios.items() if ".self_attn." not in n])
    return ratios["encoder.layers.0.self_attn.out_proj.weight"] / float(others.median())


@pytest.mark.usefixtures("registry")
def test_attention_out_proj_steps_in_line_with_the_other_layers():
    """Issue #11: after 20 KFAC steps of Embedding + TransformerEncoder, out_proj's
    step-to-gradient ratio is within 10× of the other layers' median.

    Before the attention adapter, out_proj was found as an ``nn.Linear`` whose own
    forward never runs (attention calls ``F.linear`` on its weight), so it had no
    statistics and stepped ``V / γ``, out of line by a factor growing like 1/γ. That
    state, rebuilt by giving ``nn.MultiheadAttention`` no blocks, must fail the check.
    """
    torch.manual_seed(0)
    assert 0.1 < _out_proj_against_the_median(_step_to_gradient_ratios(_TinyLM())) < 10

    torch.manual_seed(0)
    model = _TinyLM()
    grng.register_layer(nn.MultiheadAttention, _NoBlocks())
    assert _out_proj_against_the_median(_step_to_gradient_ratios(model)) > 100


def _tiny_transformers_models() -> dict[str, nn.Module]:
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=8, attn_implementation="eager",
        )
    )  # fmt: skip
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=8,
            bos_token_id=0, eos_token_id=0,
        )
    )  # fmt: skip
    return {"bert": bert, "gpt2": gpt2}


@pytest.mark.parametrize("architecture", ["torch_encoder_layer", "bert", "gpt2"])
def test_every_weight_matrix_of_a_transformer_is_in_a_kronecker_block(architecture):
    """Each weight matrix is read by the blocks named after its module (attention's
    packed in_proj by q, k and v, which together cover its rows), and one step gives
    every block finite factors of its declared shapes."""
    torch.manual_seed(9)
    tokens = torch.randint(0, 20, (2, 6))
    if architecture == "torch_encoder_layer":
        model: nn.Module = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        inputs = torch.randn(2, 6, 8)

        def loss_fn() -> Tensor:
            return model(inputs).pow(2).mean()
    else:
        model = _tiny_transformers_models()[architecture]
        if architecture == "bert":
            assert model.config._attn_implementation == "eager"

            def loss_fn() -> Tensor:
                out = model(input_ids=tokens)
                return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()
        else:

            def loss_fn() -> Tensor:
                return model(input_ids=tokens, labels=tokens).loss

    optimizer = grng.KFAC(model, factor_update_freq=1, inverse_update_freq=1)
    readers: dict[str, list[KroneckerLayer]] = {}
    names = {p: n for n, p in model.named_parameters()}
    for layer in optimizer.layers:
        readers.setdefault(names[layer.weight], []).append(layer)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        module, _, leaf = name.rpartition(".")
        blocks = readers.get(name, [])
        if leaf == "in_proj_weight":
            assert [b.name for b in blocks] == [f"{module}.in_proj.{q}" for q in "qkv"]
            covered = [i for b in blocks for i in range(p.shape[0])[b.weight_rows]]
            assert covered == list(range(p.shape[0]))
        else:
            assert [b.name for b in blocks] == [module], name

    optimizer.zero_grad()
    loss_fn().backward()
    optimizer.step()
    for layer in optimizer.layers:
        state = optimizer.state[f"layer:{layer.name}"]
        assert state["activation_factor"].shape == layer.activation_shape, layer.name
        assert state["gradient_factor"].shape == layer.gradient_shape, layer.name
        assert state["gradient_factor"].abs().sum() > 0, layer.name
        assert all(state[k].isfinite().all() for k in ("activation_factor", "gradient_factor"))


def test_attention_out_proj_is_not_reported_as_a_weight_tied_across_module_types():
    """``out_proj`` is claimed by its own attention module (the Linear submodule never runs):
    that is not tying, and warning about it on every transformer would be noise."""
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*tied across module types")
        layers = find_kronecker_layers(model, set(model.parameters()))
    assert "self_attn.out_proj" in [layer.name for layer in layers]
