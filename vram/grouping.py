"""Which modules form which group: blocks as the transfer unit, leaves as an option.

``block`` granularity: the blocks are the outermost modules of the classes a model names in
``_repeated_blocks`` (diffusers) or else ``_no_split_modules`` (diffusers and transformers),
or, when it names none, the children of its largest ``ModuleList``. Every block is a group.
The remaining modules that hold parameters form groups by the largest subtree without a
block: each child of the root (or of a module that contains blocks) is one group when no
block lies inside it and it can be called (a ``ModuleList``/``ModuleDict`` cannot: its
children are looked at instead). Parameters held directly by the root, or by a module that
contains blocks, form a group of their own, entered with that module's forward.

``leaf`` granularity: one group per module that holds parameters directly.

Groups that share a parameter (tied weights) are merged into one group with several roots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


@dataclass(eq=False)
class GroupPlan:
    """A group before binding: where its hooks go and which modules' parameters it holds."""

    name: str
    roots: list[tuple[str, torch.nn.Module]]
    members: list[tuple[str, torch.nn.Module]] = field(default_factory=list)
    block: bool = False


def _direct(module: torch.nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def block_classes(model: torch.nn.Module) -> set[str]:
    names = getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or ()
    return set(names)


def _find_blocks(model: torch.nn.Module) -> set[int]:
    """Ids of the block modules (outermost matches only)."""
    classes = block_classes(model)
    blocks: set[int] = set()

    def walk(module: torch.nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in classes:
                blocks.add(id(child))
            else:
                walk(child)

    if classes:
        walk(model)
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return set()
    largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return {id(child) for child in largest.children()
            if not isinstance(child, _CONTAINERS) and any(True for _ in child.parameters())}


def plan_groups(model: torch.nn.Module, granularity: str = "block") -> list[GroupPlan]:
    """The model's groups, in definition order (the schedule's first guess at execution order)."""
    if granularity == "leaf":
        plans = [GroupPlan(name or "(root)", [(name, module)], [(name, module)])
                 for name, module in model.named_modules() if _direct(module)]
        return merge_tied(plans)
    blocks = _find_blocks(model)
    contains: dict[int, bool] = {}

    def has_block(module: torch.nn.Module) -> bool:
        key = id(module)
        if key not in contains:
            contains[key] = key in blocks or any(has_block(c) for c in module.children())
        return contains[key]

    seen: set[int] = set()
    plans: list[GroupPlan] = []

    def subtree(module: torch.nn.Module, name: str, block: bool) -> None:
        members = []
        for sub_name, sub in module.named_modules(prefix=name):
            if id(sub) in seen and sub is not module:
                continue
            seen.add(id(sub))
            if _direct(sub):
                members.append((sub_name, sub))
        if members:
            plans.append(GroupPlan(name, [(name, module)], members, block))

    def visit(module: torch.nn.Module, name: str) -> None:
        if _direct(module):
            plans.append(GroupPlan(name or "(root)", [(name, module)], [(name, module)]))
        for child_name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            qualified = f"{name}.{child_name}" if name else child_name
            if id(child) in blocks:
                subtree(child, qualified, True)
            elif not has_block(child) and not isinstance(child, _CONTAINERS):
                subtree(child, qualified, False)
            else:
                visit(child, qualified)

    seen.add(id(model))
    visit(model, "")
    return merge_tied(plans)


def split(plan: GroupPlan) -> list[GroupPlan]:
    """A block's leaves as groups of their own (for a cap smaller than the block)."""
    return merge_tied([GroupPlan(name or "(root)", [(name, module)], [(name, module)])
                       for name, module in plan.members])


def merge_tied(plans: list[GroupPlan]) -> list[GroupPlan]:
    """Merge groups that hold the same Parameter object (tied weights) into one."""
    owner: dict[int, GroupPlan] = {}
    parent: dict[int, GroupPlan] = {id(p): p for p in plans}

    def find(plan: GroupPlan) -> GroupPlan:
        while parent[id(plan)] is not plan:
            plan = parent[id(plan)]
        return plan

    for plan in plans:
        for _, module in plan.members:
            for param in module._parameters.values():
                if param is None:
                    continue
                other = owner.setdefault(id(param), plan)
                a, b = find(other), find(plan)
                if a is not b:
                    parent[id(b)] = a
    merged: dict[int, GroupPlan] = {}
    out: list[GroupPlan] = []
    for plan in plans:
        top = find(plan)
        if top is plan:
            merged[id(plan)] = plan
            out.append(plan)
    for plan in plans:
        top = find(plan)
        if top is not plan:
            top.roots.extend(plan.roots)
            top.members.extend(plan.members)
            top.block = top.block and plan.block
            top.name = f"{top.name}+{plan.name}"
    return out


def group_sizes(model: torch.nn.Module, granularity: str = "block") -> list[tuple[str, int]]:
    """(name, elements) of each group ``model`` would be split into: planners size the
    streaming window with it (the model may live on the meta device)."""
    out = []
    for plan in plan_groups(model, granularity):
        seen: dict[int, int] = {}
        for _, module in plan.members:
            for param in module._parameters.values():
                if param is not None:
                    seen[id(param)] = param.numel()
        out.append((plan.name, sum(seen.values())))
    return out
