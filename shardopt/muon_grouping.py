"""Which parameters Muon orthogonalizes and which AdamW updates: :func:`muon_param_groups`.

Decided by module type and shape first (embeddings, norms, biases and the
output head onto the vocabulary to AdamW; other Linear weights and conv
kernels to Muon), names as an override (Jordan 2024, "Muon", "Empirical
considerations"; Liu et al. 2025, "Muon is Scalable for LLM Training",
section 2). Given only ``named_parameters()``, name and shape rules apply.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .rules import AdamWRule
from .rules.newton_schulz import matrix_shape

# Name patterns for parameters given without their modules (named_parameters()):
# the only evidence left of embeddings and heads.
DEFAULT_ADAMW_EXCLUDE = ("embed", "wte", "wpe", "lm_head", "output", "head")
# Module types whose parameters go to AdamW: Jordan 2024 ("Muon", "Empirical
# considerations": embeddings, the output layer, gains and biases to AdamW) and Liu
# et al. 2025 ("Muon is Scalable for LLM Training", Moonlight, section 2: embedding,
# lm_head and RMSNorm gains to AdamW). _NormBase covers BatchNorm*, SyncBatchNorm and
# InstanceNorm*; a custom norm (e.g. LlamaRMSNorm) is known by its class name.
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
# Module names of output heads (the last component): GPT-2's lm_head, Llama's output,
# BERT's cls.predictions.decoder, ViT's head.
HEAD_NAME = re.compile(r"(^|\.)(lm_head|head|output|decoder|classifier|embed_out|output_layer)$")
# A module declares which of its own parameters are expert stacks (one matrix per
# slice of dim 0) with this attribute, e.g. ``self.muon_expert_stacks = ("w_in", "w_out")``.
EXPERT_STACKS_ATTR = "muon_expert_stacks"


@dataclass
class MuonParamGroups(Sequence):
    """The param groups for :class:`Muon`, with the reason for each placement.

    Behaves as the list of groups (pass it to ``Muon`` or ``ZeroOptimizer``): the Muon
    group (matrices, expert stacks, conv kernels of 4 or more dimensions), the AdamW
    group (``use_muon=False``), then, if any, 3-D kernels read as ``(out, in*k)``
    (``matrix_view="flatten"``, e.g. Conv1d).
    ``placement``: ``(name, "muon" | "adamw", shape, reason)`` per trainable parameter.
    """

    groups: list[dict[str, Any]]
    placement: list[tuple[str, str, tuple[int, ...], str]] = field(default_factory=list)

    def __getitem__(self, index):  # type: ignore[override]
        return self.groups[index]

    def __len__(self) -> int:
        return len(self.groups)

    def summary(self) -> str:
        """One line per parameter: where it went, its shape, and why."""
        lines = [f"{kind:5s} {name:40s} {shape!s:20s} {reason}" for name, kind, shape, reason in self.placement]
        counts = {kind: sum(int(torch.Size(s).numel()) for _, k, s, _ in self.placement if k == kind)
                  for kind in ("muon", "adamw")}
        lines.append(f"muon: {counts['muon']:,} elements; adamw: {counts['adamw']:,} elements")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Owner:
    """A module that registers a parameter, under ``attr`` (tied weights have several)."""

    name: str
    module: nn.Module
    attr: str


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def _first_match(patterns: Sequence[re.Pattern[str]], name: str) -> str | None:
    return next((p.pattern for p in patterns if p.search(name)), None)


def _view_reason(param: Tensor, owner: _Owner | None, stack: bool) -> tuple[str, str]:
    """(matrix_view, why) of a parameter going to Muon."""
    shape = tuple(param.shape)
    what = f"nn.Parameter of {_type_name(owner.module)}" if owner is not None else "no module given"
    if stack:
        rows, cols = matrix_shape(shape, "stack")
        return "stack", f"expert stack: {shape[0]} matrices {rows}x{cols} (3-D {what})"
    rows, cols = matrix_shape(shape, "flatten")
    if owner is not None and isinstance(owner.module, nn.modules.conv._ConvNd):
        return "flatten", f"conv kernel ({_type_name(owner.module)}) as (out, in*k) = ({rows}, {cols})"
    if param.ndim == 2:
        kind = _type_name(owner.module) if owner is not None and isinstance(owner.module, nn.Linear) else what
        return "flatten", f"hidden matrix ({kind})"
    return "flatten", f"{param.ndim}-D ({what}) as ({rows}, {cols})"


class _ModelFacts:
    """What the module tree says about each parameter: its owners, the vocabulary
    sizes of the embeddings, the last Linear, and the declared expert stacks."""

    def __init__(self, model: nn.Module) -> None:
        self.owners: dict[int, list[_Owner]] = defaultdict(list)
        self.vocab: dict[int, str] = {}
        self.declared: dict[int, str] = {}
        self.last_linear: str | None = None
        for name, module in model.named_modules(remove_duplicate=False):
            for attr, param in module.named_parameters(recurse=False, remove_duplicate=False):
                self.owners[id(param)].append(_Owner(name, module, attr))
            if isinstance(module, EMBEDDING_TYPES):
                self.vocab.setdefault(module.num_embeddings, name)
            if isinstance(module, nn.Linear):
                self.last_linear = name
            for attr in getattr(module, EXPERT_STACKS_ATTR, ()):
                param = getattr(module, attr, None)
                if not isinstance(param, Tensor):
                    raise ValueError(f"Invalid {EXPERT_STACKS_ATTR} of module {name or 'model'!r}: "
                                     f"{attr!r} is not one of its parameters")
                self.declared[id(param)] = f"{name}.{EXPERT_STACKS_ATTR}" if name else EXPERT_STACKS_ATTR

    def adamw_reason(self, param: Tensor, min_ndim: int) -> str | None:
        """Why ``param`` goes to AdamW by its modules and shape, or None (Muon)."""
        owners = self.owners.get(id(param), [])
        embedding = next((o for o in owners if isinstance(o.module, EMBEDDING_TYPES)), None)
        if embedding is not None:
            head = next((o for o in owners if isinstance(o.module, nn.Linear)), None)
            if head is not None:
                return f"output head {head.name!r} tied to embedding {embedding.name!r}"
            return f"embedding ({_type_name(embedding.module)})"
        norm = next((o for o in owners if _is_norm(o.module)), None)
        if norm is not None:
            return f"norm ({_type_name(norm.module)})"
        if param.ndim < min_ndim:
            return "bias" if owners and owners[0].attr == "bias" else f"{param.ndim}-D"
        linear = next((o for o in owners if isinstance(o.module, nn.Linear)), None)
        if linear is not None and linear.module.out_features in self.vocab and (
                linear.name == self.last_linear or HEAD_NAME.search(linear.name)):
            # An untied output projection onto the vocabulary (Jordan 2024: "the final
            # output layer" to AdamW; Moonlight: lm_head).
            vocab = self.vocab[linear.module.out_features]
            return f"output head: {linear.module.out_features} = {vocab}.num_embeddings outputs"
        if linear is not None and linear.name == self.last_linear and HEAD_NAME.search(linear.name):
            # The final output layer of a classifier (Jordan 2024: "the final output
            # layer" to AdamW), known by being last and named like a head.
            return f"output layer {linear.name!r} (last nn.Linear, named like a head)"
        return None

    def owner(self, param: Tensor) -> _Owner | None:
        return next(iter(self.owners.get(id(param), [])), None)


def muon_param_groups(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    *,
    adamw_patterns: Sequence[str] | None = None,
    muon_patterns: Sequence[str] = (),
    expert_stacks: Iterable[str | Tensor] = (),
    min_ndim: int = 2,
    **adamw_group_options: Any,
) -> MuonParamGroups:
    """Split parameters into Muon groups (hidden matrices) and an AdamW group.

    Given a module, its module tree decides (Jordan 2024, "Muon", "Empirical
    considerations"; Liu et al. 2025, Moonlight, section 2): parameters of
    ``nn.Embedding``/``nn.EmbeddingBag`` and of norms (LayerNorm, RMSNorm, BatchNorm*,
    GroupNorm, InstanceNorm*, any class named ``*Norm``), biases and parameters of
    fewer than ``min_ndim`` dimensions, and the output head onto the vocabulary (a
    Linear sharing an embedding's weight, or with ``out_features`` equal to an
    embedding's ``num_embeddings`` that is the model's last Linear or named like a head,
    :data:`HEAD_NAME`; or, whatever its size, the last Linear when it is named like a
    head) go to AdamW. Every other Linear weight and conv kernel goes to
    Muon, conv kernels of any dimensionality flattened to ``(out, in*k)``, as is any
    other parameter of 2 or more dimensions, except 3-D parameters outside conv
    modules: expert stacks, one matrix per slice of dim 0. 3-D conv kernels (Conv1d)
    go to a Muon group of their own with ``matrix_view="flatten"`` (:func:`_assemble`).

    Given ``named_parameters()`` only, names and shapes decide as before: AdamW below
    ``min_ndim`` dimensions or when a name matches ``adamw_patterns`` (default
    :data:`DEFAULT_ADAMW_EXCLUDE`), Muon otherwise, 3-D parameters as stacks (a Conv1d
    kernel too: pass the module to have it flattened) and 4-D and more flattened.

    Overrides, in order: ``adamw_patterns`` and ``muon_patterns`` (regular expressions
    searched in the name; a name matching both is an error), then ``expert_stacks``
    (names as regular expressions, or the tensors; 3-D only; each must match a
    parameter) and modules' ``muon_expert_stacks`` attribute (names of their own
    parameters). Frozen parameters are left out. Options such as ``lr=3e-4`` go into
    the AdamW group (prefixless), e.g. ``muon_param_groups(model, lr=3e-4, betas=(0.9,
    0.95))``; an option AdamW does not have raises TypeError.
    """
    unknown = sorted(set(adamw_group_options) - set(AdamWRule.defaults))
    if unknown:
        raise TypeError(f"muon_param_groups() got an unexpected keyword argument {unknown[0]!r} "
                        f"(AdamW group options: {sorted(AdamWRule.defaults)})")
    facts = _ModelFacts(model) if isinstance(model, nn.Module) else None
    named = list(model.named_parameters() if isinstance(model, nn.Module) else model)
    explicit_adamw = adamw_patterns is not None
    if adamw_patterns is None:
        adamw_patterns = () if facts is not None else DEFAULT_ADAMW_EXCLUDE
    to_adamw = [re.compile(pattern) for pattern in adamw_patterns]
    to_muon = [re.compile(pattern) for pattern in muon_patterns]
    declared = _declared_stacks(named, expert_stacks, facts)

    groups: dict[str, list[Tensor]] = {"muon": [], "adamw": [], "flat3d": []}
    placement = []
    for name, param in named:
        if not param.requires_grad:
            continue
        shape = tuple(param.shape)
        adamw_hit, muon_hit = _first_match(to_adamw, name), _first_match(to_muon, name)
        if adamw_hit is not None and muon_hit is not None:
            raise ValueError(f"Invalid name overrides: {name} matches adamw_patterns {adamw_hit!r} "
                             f"and muon_patterns {muon_hit!r}")
        if adamw_hit is not None:
            reason = (f"name override: matches adamw_patterns {adamw_hit!r}" if explicit_adamw
                      else f"name matches {adamw_hit!r}")
            groups["adamw"].append(param)
            placement.append((name, "adamw", shape, reason))
            continue
        if muon_hit is not None and param.ndim < 2:
            raise ValueError(f"Invalid muon_patterns: {muon_hit!r} matches {name}, a {param.ndim}-D "
                             "parameter (Muon orthogonalizes matrices; it needs 2 or more dimensions)")
        why_adamw = None
        if muon_hit is None and id(param) not in declared:
            why_adamw = facts.adamw_reason(param, min_ndim) if facts is not None else (
                f"{param.ndim}-D" if param.ndim < min_ndim else None)
        if why_adamw is not None:
            groups["adamw"].append(param)
            placement.append((name, "adamw", shape, why_adamw))
            continue
        owner = facts.owner(param) if facts is not None else None
        stack = id(param) in declared or (
            param.ndim == 3 and not (owner is not None and isinstance(owner.module, nn.modules.conv._ConvNd)))
        view, reason = _view_reason(param, owner, stack)
        if id(param) in declared:
            reason += f" (declared in {declared[id(param)]})"
        elif facts is None and param.ndim == 2:
            reason = "hidden matrix"
        if muon_hit is not None:
            reason = f"name override: matches muon_patterns {muon_hit!r}; {reason}"
        # Only a 3-D parameter read flattened departs from the rule's shape rule; it
        # alone needs a group with matrix_view="flatten" (see _assemble).
        groups["flat3d" if view == "flatten" and param.ndim == 3 else "muon"].append(param)
        placement.append((name, "muon", shape, reason))
    return _assemble(groups, placement, adamw_group_options)


def _declared_stacks(named: Sequence[tuple[str, Tensor]], expert_stacks: Iterable[str | Tensor],
                     facts: _ModelFacts | None) -> dict[int, str]:
    """id -> where declared, for ``expert_stacks`` and modules' ``muon_expert_stacks``.

    Every entry of ``expert_stacks`` must name a parameter (a typo would otherwise
    leave a stack flattened), and every declared stack must be 3-D.
    """
    declared = dict(facts.declared) if facts is not None else {}
    for entry in expert_stacks:
        if isinstance(entry, Tensor):
            hits = [name for name, param in named if param is entry]
        elif isinstance(entry, str):
            pattern = re.compile(entry)
            hits = [name for name, _ in named if pattern.search(name)]
        else:
            raise TypeError(f"Invalid expert_stacks: {entry!r} is a {type(entry).__name__} "
                            "(expected parameter names, as regular expressions, or the parameters)")
        if not hits:
            what = entry if isinstance(entry, str) else f"a tensor of shape {tuple(entry.shape)}"
            raise ValueError(f"Invalid expert_stacks: {what!r} matches no parameter of the model")
        for name, param in named:
            if name in hits:
                declared[id(param)] = "expert_stacks"
    for name, param in named:
        if id(param) in declared and param.ndim != 3:
            raise ValueError(f"Invalid expert_stacks: {name} (declared in {declared[id(param)]}) has shape "
                             f"{tuple(param.shape)}; an expert stack is 3-D (experts, rows, cols)")
    return declared


def _assemble(groups: Mapping[str, list[Tensor]], placement: list[tuple[str, str, tuple[int, ...], str]],
              adamw_options: Mapping[str, Any]) -> MuonParamGroups:
    """The non-empty groups: Muon, AdamW, then 3-D kernels flattened.

    The Muon group has no ``matrix_view``: the rule's shape rule (2-D as is, 3-D per
    slice, 4-D and more as ``(out, rest)``) is what every parameter in it needs. Only
    3-D parameters to be flattened (Conv1d kernels) need the other reading, carried by
    a group of their own. So for any model without them the groups, and ZeroOptimizer's
    storages, are those the planner forms from names and shapes alone
    (``Muon.default_groups``), and a group of 2-D matrices keeps torch.optim.Muon's keys.
    """
    out: list[dict[str, Any]] = []
    if groups["muon"]:
        out.append({"params": groups["muon"], "use_muon": True})
    if groups["adamw"]:
        out.append({"params": groups["adamw"], "use_muon": False, **adamw_options})
    if groups["flat3d"]:
        out.append({"params": groups["flat3d"], "use_muon": True, "matrix_view": "flatten"})
    if not out:
        raise ValueError("Invalid model: no trainable parameters to split")
    return MuonParamGroups(out, placement)
