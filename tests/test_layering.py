"""The package's imports run one way, down the stack in the README's "## Layout", and never in a
circle. Read from the source (``ast``), so an import inside a function counts as much as one at
the top of a file: a lazy import cannot hide an upward edge or a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
PACKAGE = PLATFORM / "cliplab"

# Top to bottom. A module may import from its own layer and from the layers below it, never from
# one above. Each entry is a subpackage or a top-level module of cliplab ("" is cliplab/__init__.py).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),                     # the command line
    ("demo", "submit", "jobspec"),  # `cliplab demo`, `cliplab submit` (Ray jobs) and the job it sends
    ("tune",),                    # sweeps on Ray Tune, promotion, sweep reports
    ("train",),                   # Ray Train: launch, the worker loop, the Ray-free step
    ("eval",),                    # scoring, lenses, `cliplab eval`
    ("tracking",),                # MLflow tracker and spool, the pyfunc model, the registry
    ("checkpoint",),              # the checkpoint format (reads run storage through data.sources)
    ("data",),                    # shards, decoder, sources (S3), eval sets, templates, pipeline
    ("config", "experiments"),    # the experiment config and the bases sweep files start from
    ("models",),                  # open_clip models and the DualEncoder
    ("objectives",),              # the contrastive objectives
    ("distributed", "errors", "ray_connect", "redaction", "report", "services", ""),  # foundations
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PLATFORM).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, imported cliplab module)`` for every import in the file, at any depth, once per
    line and module; ``from X import name`` names module ``X.name`` where that is a module, else ``X``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return list(dict.fromkeys((line, name) for line, name in found if name == "cliplab" or name.startswith("cliplab.")))


def top(module: str) -> str:
    """The LAYERS entry of a module: ``cliplab.eval.runner`` → ``eval``; ``cliplab`` → ``""``."""
    return module.split(".")[1] if "." in module else ""


GRAPH = {m: imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    missing = sorted({top(m) for m in MODULES} - set(LAYER_OF))
    assert not missing, (f"cliplab.{', cliplab.'.join(missing)} is in no layer: add it to LAYERS in "
                         "tests/test_layering.py and to the README's '## Layout'")


def test_no_import_runs_up_the_stack():
    upward = []
    for module, found in GRAPH.items():
        for line, target in found:
            if LAYER_OF[top(target)] < LAYER_OF[top(module)]:
                upward.append(f"{MODULES[module].relative_to(PLATFORM)}:{line}: {module} (layer "
                              f"'{top(module) or 'cliplab'}') imports {target} (layer '{top(target)}', above it)")
    assert not upward, ("imports that run back up the stack (move the shared piece below both users):\n  "
                        + "\n  ".join(upward))


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    edges = {m: sorted({t for _, t in found if t != m}) for m, found in GRAPH.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle (lazy imports included): " + " -> ".join(cycle or [])


def test_find_cycle_names_the_cycle_and_the_check_sees_lazy_imports(tmp_path):
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": []}) is None
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from cliplab.cli.main import main\n")
    assert imports("cliplab.data.lazy", lazy) == [(2, "cliplab.cli.main")]


def test_every_package_docstring_says_what_it_owns_and_may_import():
    vague = [str(p.relative_to(PLATFORM)) for p in sorted(PACKAGE.rglob("__init__.py"))
             if "May import" not in (ast.get_docstring(ast.parse(p.read_text())) or "")]
    assert not vague, f"package docstrings without a 'May import' line (what the package owns and uses): {vague}"
