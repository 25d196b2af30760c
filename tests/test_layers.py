"""The package's layers, read from the source: kernels -> ops -> model and cache -> pipeline -> cli.

Every import counts, including those inside functions (a lazy import does not hide a cycle), and
every module must belong to a layer, so a new file has to be placed on purpose.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pllava_fast"
KERNELS = REPO / "kernels"  # installed as pllava_fast.kernels

LAYERS = ["kernels", "bottom", "ops", "model", "pipeline", "cli"]
# module (or package prefix) -> layer; the longest matching prefix wins
LAYER_OF = {
    "pllava_fast.kernels": "kernels",
    "pllava_fast": "bottom",  # the package root: lazy re-exports and __version__ only
    "pllava_fast._ext": "bottom", "pllava_fast._C": "bottom", "pllava_fast.checks": "bottom",
    "pllava_fast.compat": "bottom", "pllava_fast.devices": "bottom", "pllava_fast.jsonio": "bottom",
    "pllava_fast.ops": "ops",
    "pllava_fast.config": "model", "pllava_fast.config_json": "model",
    "pllava_fast.loading": "model", "pllava_fast.projector": "model", "pllava_fast.model": "model",
    "pllava_fast.kv_spec": "model", "pllava_fast.kv_cache": "model",
    "pllava_fast.quantized_cache": "model", "pllava_fast.attention": "model",
    "pllava_fast.conversation": "model", "pllava_fast.shapes": "model", "pllava_fast.merge": "model",
    "pllava_fast.llm_decode": "model", "pllava_fast.static_cache": "model",
    "pllava_fast.weight_quant": "model", "pllava_fast.weight_spec": "model",
    "pllava_fast.video": "pipeline", "pllava_fast.preprocess": "pipeline",
    "pllava_fast.pipeline": "pipeline", "pllava_fast.timing": "pipeline",
    "pllava_fast.inputs": "pipeline", "pllava_fast.dataset": "pipeline",
    "pllava_fast.profile": "pipeline", "pllava_fast.patching": "pipeline",
    "pllava_fast.original": "pipeline", "pllava_fast.comparison": "pipeline",
    "pllava_fast.chat": "pipeline", "pllava_fast.preflight": "pipeline",
    "pllava_fast.testing": "pipeline",
    "pllava_fast.cli": "cli", "pllava_fast.__main__": "cli",
}


def _modules():
    """{module name: (path, is_package)} for every source file of the package and kernels/."""
    out = {}
    for root, prefix in ((PACKAGE, "pllava_fast"), (KERNELS, "pllava_fast.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = (path, is_pkg)
    return out


MODULES = _modules()


def _layer(module: str) -> str | None:
    best = None
    for prefix, layer in LAYER_OF.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best and best[1]


def _imports(module: str) -> set[str]:
    """The pllava_fast modules ``module`` imports anywhere in its source."""
    path, is_pkg = MODULES[module]
    package = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule sub when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "pllava_fast" or name.startswith("pllava_fast."):
                while name not in MODULES and "." in name:  # e.g. pllava_fast._C (built)
                    if name in LAYER_OF:
                        break
                    name = name.rpartition(".")[0]
                if name != module:
                    found.add(name)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def test_kernels_import_nothing_from_the_package():
    bad = {m: sorted(t for t in deps if _layer(t) != "kernels")
           for m, deps in GRAPH.items() if _layer(m) == "kernels"}
    assert {m: d for m, d in bad.items() if d} == {}


def test_nothing_imports_upward():
    upward = [f"{m} ({_layer(m)}) -> {t} ({_layer(t)})" for m, deps in GRAPH.items()
              for t in deps if LAYERS.index(_layer(t)) > LAYERS.index(_layer(m))]
    assert upward == []


def test_no_import_cycles():
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert cycles == []


@pytest.mark.parametrize("root", [PACKAGE, KERNELS], ids=["pllava_fast", "kernels"])
def test_files_stay_small(root):
    long = {str(p.relative_to(REPO)): n for p in root.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_the_walk_sees_lazy_imports():
    """The checks above can fail: a function-level import is an edge like any other."""
    assert "pllava_fast.pipeline" in GRAPH["pllava_fast.cli.caption"]
    assert "pllava_fast.kernels.pooling" in GRAPH["pllava_fast.ops.pooling"]
