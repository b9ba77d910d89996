"""Issue #11, items 3–5: the coverage report, control (exclude=, param_groups=,
max_factor_dim=) and the parameter lifecycle (unfreezing, torch.compile, lazy modules)."""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from grng.distributed import strip_wrapper_prefix

#: One of each optimizer, with constructor keywords that capture and refresh every step.
OPTIMIZERS: dict[str, tuple[type[grng.CurvatureOptimizer], dict[str, Any]]] = {
    "KFAC": (grng.KFAC, dict(inverse_update_freq=2)),
    "RING": (grng.RING, dict(rho=0.05, inverse_update_freq=2)),
    "RENG": (grng.RENG, dict(rho=0.05, inverse_update_freq=2, hvp="finite_difference")),
    "RKalman": (grng.RKalman, dict(rho=0.05, rows_per_update=4)),
}


def make(name: str, model: nn.Module, **kwargs: Any) -> grng.CurvatureOptimizer:
    cls, base = OPTIMIZERS[name]
    return cls(model, **{"factor_update_freq": 1, **base, **kwargs})


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(i: int, n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_step(model: nn.Module, optimizer: grng.CurvatureOptimizer, i: int) -> None:
    x, y = batch(i)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)


def quiet(factory: Any, *args: Any, **kwargs: Any) -> Any:
    """Build without the coverage warning (for models that are small on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", grng.CoverageWarning)
        return factory(*args, **kwargs)


# ------------------------------------------------------------------------------ coverage
class Mixed(nn.Module):
    """Linear, attention (q/k/v blocks), grouped conv, a norm, a bare parameter, tying."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 8)
        self.twin = nn.Linear(8, 8, bias=False)
        self.twin.weight = self.head.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(h) * self.scale
        return self.head(h) + self.twin(h)


def test_coverage_lists_every_parameter_once_with_its_kind_module_and_blocks() -> None:
    torch.manual_seed(0)
    model = Mixed()
    model.norm.bias.requires_grad_(False)
    optimizer = quiet(grng.KFAC, model)
    coverage = optimizer.coverage()
    assert [e.name for e in coverage] == [n for n, _ in model.named_parameters()]  # tied: once
    kinds = {e.name: e.kind for e in coverage}
    assert kinds == {
        "scale": "diagonal",
        "inp.weight": "kronecker",
        "inp.bias": "kronecker",
        "attn.in_proj_weight": "kronecker",
        "attn.in_proj_bias": "kronecker",
        "attn.out_proj.weight": "kronecker",
        "attn.out_proj.bias": "kronecker",
        "conv.weight": "kronecker",
        "conv.bias": "kronecker",
        "norm.weight": "diagonal",
        "norm.bias": "frozen",
        "head.weight": "kronecker",
        "head.bias": "kronecker",
    }
    assert coverage["attn.in_proj_weight"].blocks == (
        "attn.in_proj.q",
        "attn.in_proj.k",
        "attn.in_proj.v",
    )
    assert coverage["attn.in_proj_weight"].module_type == "MultiheadAttention"
    assert coverage["conv.weight"].blocks == ("conv.group0", "conv.group1")
    assert coverage["head.weight"].blocks == ("head",)
    assert coverage["norm.weight"].module_type == "LayerNorm"
    assert coverage["scale"].module_type == "Mixed" and coverage["scale"].numel == 8
    assert coverage.totals["frozen"] == 8
    assert sum(coverage.totals.values()) == sum(p.numel() for p in model.parameters())
    table = str(coverage)
    for line in ("attn.in_proj.q, attn.in_proj.k, attn.in_proj.v", "no adapter for LayerNorm"):
        assert line in table
    for kind in ("kronecker", "diagonal", "frozen", "total"):
        assert any(row.startswith(kind) for row in table.splitlines()[-4:])


class Volumes(nn.Module):
    """Mostly a Conv3d, which has no adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 8, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x).mean((2, 3, 4)))


def test_construction_warns_once_when_much_of_the_model_gets_only_the_diagonal() -> None:
    with pytest.warns(grng.CoverageWarning) as caught:
        grng.KFAC(Volumes())
    assert len(caught) == 1
    message = str(caught[0].message)
    for part in ("conv.weight (Conv3d", "optimizer.coverage()", "register_layer", "exclude="):
        assert part in message
    assert caught[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", grng.CoverageWarning)
        grng.KFAC(Volumes(), exclude=nn.Conv3d)  # asked for: silent
        grng.KFAC(nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8)))


# ------------------------------------------------------------------------------- exclude
def test_exclude_by_name_type_or_predicate_gives_the_diagonal_fallback() -> None:
    def kinds(**kwargs: Any) -> dict[str, str]:
        model = nn.Sequential(
            nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 4), nn.Conv1d(4, 4, 1)
        )
        optimizer = quiet(grng.KFAC, model, **kwargs)
        return {e.name.removesuffix(".weight"): e.kind for e in optimizer.coverage()
                if e.name.endswith("weight")}  # fmt: skip

    assert kinds(exclude="0") == {"0.0": "diagonal", "0.1": "diagonal", "1": "kronecker",
                                  "2": "kronecker"}  # fmt: skip
    assert kinds(exclude=["0.1", nn.Conv1d]) == {"0.0": "kronecker", "0.1": "diagonal",
                                                 "1": "kronecker", "2": "diagonal"}  # fmt: skip
    assert kinds(exclude=lambda name, module: name == "1") == {
        "0.0": "kronecker", "0.1": "kronecker", "1": "diagonal", "2": "kronecker"}  # fmt: skip
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    optimizer = grng.KFAC(model, exclude="1")
    assert [layer.name for layer in optimizer.layers] == ["0"]
    assert optimizer.coverage()["1.weight"].note == "excluded"
    with pytest.raises(ValueError, match="'nope'"):
        grng.KFAC(model, exclude=["0", "nope"])


# -------------------------------------------------------------------------- param_groups
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_param_groups_keep_weight_decay_off_biases_and_norm_weights(name: str) -> None:
    def start() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3))

    def one_step(**kwargs: Any) -> tuple[nn.Module, grng.CurvatureOptimizer]:
        model = start()
        optimizer = quiet(make, name, model, momentum=0.0, kl_clip=None, **kwargs)
        train_step(model, optimizer, 0)
        return model, optimizer

    plain, _ = one_step()
    no_decay = [n for n, p in start().named_parameters() if p.dim() < 2]  # biases, norm weight
    assert no_decay == ["0.bias", "1.weight", "1.bias", "2.bias"]
    decayed, optimizer = one_step(
        weight_decay=0.5, param_groups=[{"params": no_decay, "weight_decay": 0.0}]
    )
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 4]
    lr = optimizer.param_groups[0]["lr"]
    for (n, p), q, s in zip(
        decayed.named_parameters(), plain.parameters(), start().parameters(), strict=True
    ):
        # (Not bit-equal: the groups change the order of RING's sum ‖g‖².)
        if p.dim() < 2:  # not decayed: the step of the run without weight decay
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
        else:  # θ(1 − lr·wd) − lr·Δ, the same Δ
            torch.testing.assert_close(p, q - lr * 0.5 * s, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", ["KFAC", "RING"])
def test_block_with_weight_and_bias_in_different_groups_uses_the_weights_damping(
    name: str,
) -> None:
    """The block's damping (and RING's ρ) come from its weight's group; lr is per parameter."""

    def one_step(**kwargs: Any) -> nn.Module:
        model = mlp()
        optimizer = make(name, model, momentum=0.0, kl_clip=None, damping=1e-2, **kwargs)
        train_step(model, optimizer, 0)
        train_step(model, optimizer, 1)
        return model

    bias_group: dict[str, Any] = {"params": ["0.bias"], "damping": 10.0}
    if name == "RING":
        bias_group["rho"] = 5.0
    split = one_step(param_groups=[bias_group])
    together = one_step()
    for p, q in zip(split.parameters(), together.parameters(), strict=True):
        # Rounding only: the groups change the order of RING's sum ‖g‖².
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    frozen_bias = one_step(param_groups=[{"params": ["0.bias"], "lr": 0.0}])
    assert torch.equal(frozen_bias[0].bias, mlp()[0].bias)
    assert not torch.equal(frozen_bias[0].weight, mlp()[0].weight)


def test_param_groups_accept_parameters_and_refuse_duplicates_unknown_names_and_keys() -> None:
    model = mlp()
    optimizer = grng.KFAC(model, param_groups=[{"params": [model[2].weight], "lr": 0.1}])
    assert optimizer.param_groups[1]["params"] == [model[2].weight]
    default_lr = inspect.signature(grng.KFAC).parameters["lr"].default
    assert optimizer.param_groups[1]["lr"] == 0.1 and optimizer.param_groups[0]["lr"] == default_lr
    with pytest.raises(ValueError, match=r"'2\.weight' is listed twice"):
        grng.KFAC(model, param_groups=[{"params": ["2.weight"]}, {"params": [model[2].weight]}])
    with pytest.raises(ValueError, match=r"'2\.wieght'"):
        grng.KFAC(model, param_groups=[{"params": ["2.wieght"]}])
    with pytest.raises(TypeError, match="'dampin'"):
        grng.KFAC(model, param_groups=[{"params": ["2.weight"], "dampin": 1e-3}])
    with pytest.raises(TypeError, match="'rho'"):
        grng.KFAC(model, param_groups=[{"params": ["2.weight"], "rho": 1e-3}])
    grng.RING(model, param_groups=[{"params": ["2.weight"], "rho": 0.0}])
    # Every parameter listed: no empty default group.
    everything = [{"params": [n for n, _ in model.named_parameters()], "lr": 0.2}]
    assert [g["lr"] for g in grng.KFAC(model, param_groups=everything).param_groups] == [0.2]


# ------------------------------------------------------------------------- max_factor_dim
def test_max_factor_dim_keeps_wide_sides_diagonal_and_defaults_to_4096() -> None:
    resnet_stage = nn.Conv2d(512, 512, 3, bias=False)  # ResNet-18's widest: d_A = 4608
    optimizer = grng.KFAC(resnet_stage)
    (layer,) = optimizer.layers
    assert optimizer.options.max_factor_dim == 4096
    assert (layer.activation_dim, layer.activation_diagonal) == (4608, True)
    assert (layer.gradient_dim, layer.gradient_diagonal) == (512, False)
    assert optimizer.coverage()["weight"].note == "diagonal side A (4608)"
    (layer,) = grng.KFAC(resnet_stage, max_factor_dim=None).layers
    assert not layer.activation_diagonal and not layer.gradient_diagonal
    # A capped side trains (its factor is the diagonal E[a²]).
    model = mlp()
    optimizer = make("KFAC", model, max_factor_dim=8, inverse="eigh")
    assert [(la.activation_diagonal, la.gradient_diagonal) for la in optimizer.layers] == [
        (False, False), (True, False), (True, False)]  # fmt: skip
    for i in range(4):
        train_step(model, optimizer, i)
    assert optimizer.state["layer:2"]["activation_factor"].shape == (9,)
    assert optimizer.nonfinite_steps == 0


# ------------------------------------------------------------------------------ lifecycle
def has_curvature(optimizer: grng.CurvatureOptimizer, block: str) -> bool:
    """Whether a block's state holds any factor (an empty entry may exist)."""
    state = optimizer.state.get(f"layer:{block}", {})  # type: ignore[call-overload]
    return any(isinstance(v, Tensor) and v.dim() > 0 for v in state.values())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("frozen", ["0", "2"])  # first layer; a middle one (output needs grad)
def test_parameter_frozen_at_construction_trains_after_unfreezing(name: str, frozen: str) -> None:
    """Gradual unfreezing: a layer frozen when the optimizer is built trains with
    curvature once unfrozen, exactly like one frozen right after construction."""
    at_construction = mlp()
    at_construction.get_submodule(frozen).requires_grad_(False)
    a = make(name, at_construction)
    after_construction = mlp()
    b = make(name, after_construction)
    after_construction.get_submodule(frozen).requires_grad_(False)
    key = f"layer:{frozen}"
    for i in range(5):
        train_step(at_construction, a, i)
        train_step(after_construction, b, i)
    assert not has_curvature(a, frozen) and not has_curvature(b, frozen)  # not captured
    assert a.coverage()[f"{frozen}.weight"].kind == "frozen"
    before = copy.deepcopy(at_construction.get_submodule(frozen).state_dict())
    at_construction.get_submodule(frozen).requires_grad_(True)
    after_construction.get_submodule(frozen).requires_grad_(True)
    assert a.coverage()[f"{frozen}.weight"].kind == "kronecker"
    for i in range(5, 10):
        train_step(at_construction, a, i)
        train_step(after_construction, b, i)
        for p, q in zip(at_construction.parameters(), after_construction.parameters(),
                        strict=True):  # fmt: skip
            assert torch.equal(p, q)
    layer = at_construction.get_submodule(frozen)
    assert not torch.equal(layer.weight, before["weight"])
    assert not torch.equal(layer.bias, before["bias"])
    updates = a.state[key].get("activation_factor_updates", a.state[key].get("updates"))
    assert int(updates) == 5  # captured from the unfreezing on, each step
    # The state travels: a fresh optimizer on a model frozen the same way accepts it.
    fresh = copy.deepcopy(at_construction)
    fresh.get_submodule(frozen).requires_grad_(False)
    c = make(name, fresh)
    c.load_state_dict(a.state_dict())


def test_bias_of_a_frozen_weight_trains_with_the_diagonal_fallback() -> None:
    """BitFit-style: a trainable bias whose block is inactive is not preconditioned by
    an empty block (``V / γ``) but by its diagonal Fisher, until the weight trains."""
    model = mlp()
    model[0].weight.requires_grad_(False)
    optimizer = make("KFAC", model)
    for i in range(3):
        train_step(model, optimizer, i)
    assert optimizer.coverage()["0.bias"].kind == "diagonal"
    assert "diagonal:0.bias" in optimizer.state and not has_curvature(optimizer, "0")
    model[0].weight.requires_grad_(True)
    assert optimizer.coverage()["0.bias"].kind == "kronecker"
    train_step(model, optimizer, 3)
    assert has_curvature(optimizer, "0")


def test_bias_frozen_while_its_weight_trains_stays_out_of_the_block() -> None:
    model = mlp()
    model[0].bias.requires_grad_(False)
    optimizer = make("KFAC", model)
    assert optimizer.layers[0].bias is None and optimizer.layers[0].activation_dim == 5


def test_model_frozen_entirely_is_still_refused() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        grng.KFAC(mlp().requires_grad_(False))


def test_state_dict_of_an_optimizer_on_a_compiled_model_loads_on_the_plain_model() -> None:
    model = mlp()
    compiled = torch.compile(model)
    assert strip_wrapper_prefix("_orig_mod.0.weight", compiled) == "0.weight"
    nested = torch.compile(nn.DataParallel(mlp()))
    assert strip_wrapper_prefix("_orig_mod.module.2.bias", nested) == "2.bias"
    optimizer = make("KFAC", compiled)
    assert [layer.name for layer in optimizer.layers] == ["0", "2", "4"]
    assert optimizer.coverage()[0].name == "0.weight"
    for i in range(3):  # through the model inside (compiling is slow and beside the point)
        train_step(model, optimizer, i)
    plain = make("KFAC", copy.deepcopy(model))
    plain.load_state_dict(optimizer.state_dict())
    names = {k for k in optimizer.state if isinstance(k, str)}
    assert "layer:0" in names and names == {k for k in plain.state if isinstance(k, str)}
    # The model that is itself one block keeps its type name under the wrapper.
    linear = nn.Linear(3, 2)
    assert [la.name for la in grng.KFAC(torch.compile(linear)).layers] == ["Linear"]


def test_lazy_module_is_refused_until_its_first_forward() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="forward pass"):
        grng.KFAC(model)
    model(torch.randn(3, 7))
    optimizer = grng.KFAC(model)
    assert optimizer.layers[0].activation_dim == 8


def test_frozen_bias_is_left_out_before_the_size_cap_decides() -> None:
    """Regression: the cap saw the bias column of a bias frozen at construction (d_A 9 > 8)
    and made the side diagonal, although the block's d_A is 8; coverage then called the
    unfrozen bias 'no adapter for Linear'."""
    model = nn.Linear(8, 3)
    model.bias.requires_grad_(False)
    optimizer = grng.KFAC(model, max_factor_dim=8)
    (layer,) = optimizer.layers
    assert layer.bias is None and layer.activation_dim == 8 and not layer.activation_diagonal
    model.bias.requires_grad_(True)
    entry = optimizer.coverage()["bias"]
    assert entry.kind == "diagonal" and "frozen at construction" in entry.note


def test_skipped_step_warning_points_at_the_callers_line() -> None:
    model = nn.Linear(4, 2)
    optimizer = grng.KFAC(model)
    model(torch.randn(3, 4)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    (warning,) = [w for w in caught if "skipped a step" in str(w.message)]
    assert warning.filename == __file__


def test_max_factor_dim_says_which_sides_it_made_diagonal() -> None:
    model = nn.Sequential(nn.Linear(10, 3), nn.Linear(3, 2))
    with pytest.warns(grng.CoverageWarning, match=r"max_factor_dim=8 keeps 1 .*0 A \(11\)"):
        grng.KFAC(model, max_factor_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", grng.CoverageWarning)
        grng.KFAC(model, max_factor_dim=None)
        grng.KFAC(model)  # every side within the default cap


def test_max_factor_dim_warning_skips_embedding_tokens_and_frozen_blocks() -> None:
    """Regression: a frozen 30522-token word embedding (its token side diagonal by design)
    was reported as a side the cap had made diagonal."""
    model = nn.ModuleList([nn.Embedding(50, 4), nn.Linear(4, 13), nn.Linear(3, 2)])
    model[1].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", grng.CoverageWarning)
        grng.KFAC(model, max_factor_dim=12)
    model[1].requires_grad_(True)
    with pytest.warns(grng.CoverageWarning, match=r"keeps 1 factor side.*1 G \(13\)"):
        grng.KFAC(model, max_factor_dim=12)
