"""The package's layers import downwards only: rules <- passes <- calibration <- pipeline <- api / cli."""

import ast
import pathlib

import onnxprune

ROOT = pathlib.Path(onnxprune.__file__).parent
# a module of a layer may import from its own layer and the ones before it (graph, errors, result... are shared)
ORDER = ["rules", "passes", "calibration"]


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnxprune."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("onnxprune.")}
    return found


def test_no_folder_imports_a_later_one():
    for i, layer in enumerate(ORDER):
        later = set(ORDER[i + 1 :]) | {"pipeline", "api", "cli"}
        for path in (ROOT / layer).rglob("*.py"):
            wrong = _imports(path) & later
            assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}, a later layer"
