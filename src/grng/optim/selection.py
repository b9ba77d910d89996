"""Which parameters an optimizer holds, in which groups, and which modules are excluded.

The pieces of :class:`grng.CurvatureOptimizer`'s constructor that read the user's
``model``, ``exclude=`` and ``param_groups=`` (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from grng.distributed import strip_wrapper_prefix
from grng.optim.options import check_group_hyperparameters

#: What ``exclude=`` accepts: module names, module types, predicates ``(name, module)``.
ExcludeRule = str | type[nn.Module] | Callable[[str, nn.Module], bool]


def model_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` once (frozen ones too); refuses lazy ones."""
    lazy = [
        strip_wrapper_prefix(n, model)
        for n, p in model.named_parameters()
        if isinstance(p, nn.parameter.UninitializedParameter)
    ]
    if lazy:
        raise ValueError(
            f"model has uninitialized (lazy) parameters: {', '.join(lazy)}. Run one forward "
            "pass (e.g. on a batch of the training data) before building the optimizer, as "
            "torch.optim requires: their shapes, and so the Kronecker blocks, are unknown."
        )
    return list(dict.fromkeys(model.parameters()))


def excluded_modules(
    exclude: ExcludeRule | Iterable[ExcludeRule] | None, model: nn.Module
) -> set[nn.Module]:
    """The modules ``exclude`` names, each with its descendants (see CurvatureOptimizer)."""
    if exclude is None:
        return set()
    rules: list[Any]
    if isinstance(exclude, nn.Module):
        raise TypeError(
            "exclude takes module names, module types or predicates, not a module instance "
            f"({type(exclude).__name__}); pass its name in model.named_modules()"
        )
    if isinstance(exclude, (str, type)) or callable(exclude):
        rules = [exclude]
    elif isinstance(exclude, Iterable) and not isinstance(exclude, Mapping):
        rules = list(exclude)
    else:
        raise TypeError(
            "exclude must be a module name, a module type, a predicate (name, module) -> bool, "
            f"or a list of them, got {type(exclude).__name__} {exclude!r}"
        )
    modules = [(strip_wrapper_prefix(n, model), m) for n, m in model.named_modules()]
    names: set[str] = set()
    types: list[type] = []
    predicates: list[Callable[[str, nn.Module], bool]] = []
    for rule in rules:
        if isinstance(rule, str):
            names.add(strip_wrapper_prefix(rule, model))
        elif isinstance(rule, type) and issubclass(rule, nn.Module):
            types.append(rule)
        elif callable(rule) and not isinstance(rule, (type, nn.Module)):
            predicates.append(rule)
        else:
            raise TypeError(
                "exclude: each entry must be a module name (str), an nn.Module subclass or "
                f"a predicate (name, module) -> bool, got {type(rule).__name__} {rule!r}"
            )
    unknown = sorted(names - {n for n, _ in modules})
    if unknown:
        raise ValueError(
            f"exclude: the model has no module named {', '.join(map(repr, unknown))} "
            "(names as in model.named_modules(), without wrapper prefixes)"
        )
    excluded: set[nn.Module] = set()
    for name, module in modules:
        if (
            name in names
            or isinstance(module, tuple(types))
            or any(bool(rule(name, module)) for rule in predicates)
        ):
            excluded.add(module)
    # An excluded module takes its descendants with it.
    for module in list(excluded):
        excluded.update(module.modules())
    return excluded


def resolve_param_groups(
    param_groups: Sequence[Mapping[str, Any]] | None,
    params: list[nn.Parameter],
    model: nn.Module,
    defaults: dict[str, Any],
    refuse_unknown: Callable[[dict[str, Any], str], None],
) -> list[dict[str, Any]]:
    """``param_groups=`` as torch.optim groups of Parameters, the default group first."""
    if param_groups is None:
        return [{"params": params}]
    if isinstance(param_groups, (str, Mapping)) or not isinstance(param_groups, Sequence):
        raise TypeError(
            "param_groups must be a list of dicts like {'params': [names], 'lr': 0.1}, "
            f"got {type(param_groups).__name__}"
        )
    name_of = {p: n for n, p in model.named_parameters()}
    by_name = {strip_wrapper_prefix(n, model): p for n, p in model.named_parameters()}
    # Every alias of a tied parameter names it.
    for n, p in model.named_parameters(remove_duplicate=False):
        by_name.setdefault(strip_wrapper_prefix(n, model), p)
    ours = set(params)
    order = {p: k for k, p in enumerate(params)}
    listed: dict[nn.Parameter, int] = {}
    resolved = []
    for i, group in enumerate(param_groups):
        where = f"param_groups[{i}]"
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"{where} must be a dict with a 'params' entry, got {group!r}")
        refuse_unknown(dict(group), where)
        try:
            check_group_hyperparameters({**defaults, **group})
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None
        entries = group["params"]
        if isinstance(entries, (str, Tensor)):
            entries = [entries]
        members: list[nn.Parameter] = []
        for entry in entries:
            if isinstance(entry, str):
                named = by_name.get(strip_wrapper_prefix(entry, model))
                if named is None:
                    raise ValueError(
                        f"{where}: the model has no parameter named {entry!r} "
                        "(names as in model.named_parameters(), without wrapper prefixes)"
                    )
                p = named
            elif isinstance(entry, nn.Parameter):
                if entry not in ours:
                    raise ValueError(
                        f"{where}: a parameter of shape {tuple(entry.shape)} is not a "
                        "parameter of the model"
                    )
                p = entry
            else:
                raise TypeError(
                    f"{where}: 'params' must hold parameter names or Parameters, got "
                    f"{type(entry).__name__} {entry!r}"
                )
            if p in listed:
                other = listed[p]
                raise ValueError(
                    f"{where}: parameter {strip_wrapper_prefix(name_of[p], model)!r} is listed twice"
                    + ("" if other == i else f" (also in param_groups[{other}])")
                )
            listed[p] = i
            members.append(p)
        if not members:
            raise ValueError(f"{where} lists no parameter")
        members.sort(key=order.__getitem__)
        resolved.append({**group, "params": members})
    rest = [p for p in params if p not in listed]
    return ([{"params": rest}] if rest else []) + resolved
