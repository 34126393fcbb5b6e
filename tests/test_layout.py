"""The layout rules of ARCHITECTURE.md that a script can check: the core names no method and imports none, files
stay short, and the method list exists once (the registry), read by the CLI and the package exports."""

import ast
import re

import hf_robust
from conftest import REPO
from hf_robust.methods import registry

LIBRARY = REPO / "hf_robust"
METHOD_NAMES = re.compile(r"masktune|gradtune|fair_?dropout|counterfactual|dfr|group_?dro|jtt|subg|reweight", re.IGNORECASE)


def _imports(path):
    """Absolute names of the hf_robust modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append(".".join(base + ([node.module] if node.module else [])))
            else:
                found.append(node.module or "")
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith("hf_robust")]


def test_the_core_names_no_method_and_imports_only_the_registry():
    for path in sorted((LIBRARY / "core").glob("*.py")):
        text = path.read_text()
        assert not METHOD_NAMES.search(text), f"{path.name} names a method: {METHOD_NAMES.search(text).group()}"
        for name in _imports(path):
            assert not name.startswith("hf_robust.methods") or name == "hf_robust.methods.registry", (path.name, name)


# deprecation shims, the only exceptions: the old import path of a name that moved into a method's package
SHIMS = {("models/adapter.py", "hf_robust.methods.fair_dropout.positions")}


def test_layers_below_the_methods_import_no_method():
    for layer in ("models", "explain", "data", "reporting", "resources"):
        for path in sorted((LIBRARY / layer).glob("*.py")):
            where = path.relative_to(LIBRARY).as_posix()
            imported = [n for n in _imports(path) if n.startswith("hf_robust.methods") and (where, n) not in SHIMS]
            assert not imported, (where, imported)


def test_library_files_are_short():
    lengths = {path.relative_to(LIBRARY).as_posix(): len(path.read_text().splitlines())
               for path in LIBRARY.rglob("*.py")}
    assert lengths["core/trainer.py"] < 400
    assert {name: n for name, n in lengths.items() if n > 500} == {}


def test_the_method_list_is_the_registry():
    script = (REPO / "scripts" / "train.py").read_text()
    assert "from hf_robust.methods.registry import DEFAULT_METHOD, METHODS" in script
    assert "METHODS = {" not in script and "METHODS: dict" not in script
    for spec in registry.METHODS.values():  # each method's classes are exported under their names
        for path in (spec.config, spec.trainer):
            name = path.partition(":")[2]
            assert getattr(hf_robust, name) is registry.load_object(path)
    # one MethodSpec per method, nowhere else a list of the method names
    lists = [p for p in LIBRARY.rglob("*.py")
             if re.search(r"\"masktune\",\s*\"gradtune\"|\"erm\",\s*\"masktune\"", p.read_text())]
    assert lists == [], lists
