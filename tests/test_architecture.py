"""The package's structure, read with ast: packages by job on floors, every import pointing down (or within
its own package); no import cycles among surgeon's modules; the stages reach the toy world only through
surgeon.inputs.defaults (the toy's own apps and the CLI's `toy` verbs aside); the toy-by-default rule is stated
once (surgeon.core.fallback); only surgeon.model.hooks names open_clip's model parts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import surgeon

PACKAGE = Path(surgeon.__file__).parent
GENERATED = "surgeon.v1"  # gRPC stubs written by surgeon.server.codegen
TOY = "surgeon.inputs.toy"
#: what may import the toy world: the defaults place, the toy's own apps, and the shell whose `toy` verbs run them
TOY_IMPORTERS = {"surgeon.inputs.defaults", "surgeon.studies.toy_train", "surgeon.studies.toy_report", "surgeon.cli"}
TOY_RULE = "surgeon.core.fallback"
#: surgeon's packages (and top-level modules) from the floor up: each may import only what stands below it
FLOORS = [
    ["core"],
    ["results", "model"],
    ["inputs"],
    ["runtime", "ranking"],
    ["validation"],
    ["selection"],
    ["exporting"],
    ["pruning"],
    ["studies"],
    ["api"],
    ["server"],
    ["cli"],
]
#: the package itself (its version) and its launcher stand outside the floors
OUTSIDE = {"surgeon", "surgeon.__main__", GENERATED}
MAX_TOP_LEVEL_MODULES = 4
ADAPTER = "surgeon.model.hooks"
#: open_clip's names for model parts, which no surgeon class reuses (num_heads, out_proj, ln_q... are also
#: PrunedAttention's own, image_size the toy world's, encode_text a LoadedModel method: those are left out)
ARCHITECTURE_PARTS = {
    "visual", "transformer", "resblocks", "attn", "ln_1", "ls_1", "ls_2", "ln_attn", "ln_inner", "ln_post",
    "proj", "_embeds", "_pool", "output_dim", "logit_scale", "head_scale",
}  # fmt: skip


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["surgeon", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name != GENERATED and not name.startswith(GENERATED + "."):
            modules[name] = path
    return modules


def _imported(name: str, path: Path) -> set[str]:
    """Every dotted name an import statement anywhere in the file can bind (`from a import b` -> a, a.b)."""
    names = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the surgeon modules it imports (a name inside a module counts as the module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for target in _imported(name, path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            child = next(successors, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "surgeon.cli" in graph and "surgeon.model.surgery" in graph["surgeon.pruning.prune"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def unit(module: str) -> str:
    """The package (or top-level module) a module belongs to: surgeon.ranking.judges.base -> ranking."""
    return module.split(".")[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    floor = {name: level for level, names in enumerate(FLOORS) for name in names}
    found = []
    for name, targets in sorted(graph.items()):
        if name in OUTSIDE:
            continue
        for target in sorted(targets):
            if target in OUTSIDE or unit(target) == unit(name):
                continue
            if floor[unit(target)] >= floor[unit(name)]:
                found.append(f"{name} -> {target}")
    return found


def test_the_floor_check_finds_an_import_running_upward():
    graph = {"surgeon.core.paths": {"surgeon.model.load"}, "surgeon.model.load": {"surgeon.core.errors"}}
    assert upward_imports(graph) == ["surgeon.core.paths -> surgeon.model.load"]
    assert upward_imports({"surgeon.results.bias": {"surgeon.model.hooks"}}) == [
        "surgeon.results.bias -> surgeon.model.hooks"
    ]  # the same floor is not below


def test_every_import_points_down_the_floors():
    graph = import_graph()
    units = {unit(name) for name in graph if name not in OUTSIDE}
    assert units == {name for names in FLOORS for name in names}, "a package is missing from FLOORS"
    found = upward_imports(graph)
    assert not found, "imports running up (or sideways on one floor):\n" + "\n".join(found)


def test_at_most_four_modules_stand_directly_under_surgeon():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def test_stages_reach_the_toy_world_only_through_defaults():
    graph = import_graph()
    offenders = sorted(
        name
        for name, targets in graph.items()
        if not name.startswith(TOY) and name not in TOY_IMPORTERS and any(t.startswith(TOY) for t in targets)
    )
    assert not offenders, f"{offenders} import {TOY}; ask surgeon.inputs.defaults instead"


def test_the_toy_by_default_rule_is_stated_once():
    """ "No data given -> the toy world's, for the toy model only" lives in surgeon.core.fallback; the stages ask it
    (it was restated in api, images, pools, validate, study, load and policies, each a chance to drift)."""
    restated = re.compile(r'in \(None, "toy"\)|model == "toy"|not the toy model|"toy" if|None or \w+ == TOY_MODEL_NAME')
    offenders = [
        f"{name}:{number}"
        for name, path in _modules().items()
        if name != TOY_RULE and not name.startswith(TOY)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if restated.search(line)
    ]
    assert not offenders, f"{offenders} restate the toy default; ask surgeon.core.fallback"


def part_reads(source: str) -> list[tuple[int, str]]:
    """(line, expression) of every attribute access to an open_clip model part in `source`."""
    tree = ast.parse(source)
    nodes = (node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in ARCHITECTURE_PARTS)
    return sorted((node.lineno, ast.unparse(node)) for node in nodes)


def test_the_scan_finds_reads_and_writes_of_model_parts():
    source = "blocks = model.visual.transformer.resblocks\nblock.attn = new\nsize = cfg.image_size"
    assert [expr for _, expr in part_reads(source)] == [
        "model.visual",
        "model.visual.transformer",
        "model.visual.transformer.resblocks",
        "block.attn",
    ]


def test_only_hooks_reaches_into_the_architecture():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {expr}"
        for name, path in sorted(_modules().items())
        if name != ADAPTER
        for line, expr in part_reads(path.read_text(encoding="utf-8"))
    ]
    assert not found, "use surgeon.model.hooks' accessors instead of:\n" + "\n".join(found)
