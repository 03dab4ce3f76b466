"""Imports go one way: ``foundv2`` may import ``data_modules``, never the reverse."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_data_modules_never_import_foundv2():
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f) if m.split(".")[0] == "foundv2")
                 for f in (ROOT / "data_modules").rglob("*.py")}
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from foundv2.io import x\n    import foundv2.cli\n")
    assert imported_modules(f) == {"foundv2.io", "foundv2.cli"}
