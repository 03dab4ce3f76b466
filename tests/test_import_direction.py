"""Imports go one way: ``foundv2`` may import ``data_modules``, never the reverse; only the
command itself (``foundv2/cli.py``, ``foundv2/__main__.py``) imports ``foundv2.cli``: library
code, tests and benchmarks use ``foundv2.launch``."""

from pathlib import Path

from foundv2.pipeline import module_imports

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    return module_imports(path.read_text())


def _offenders(files, forbidden) -> dict[str, list[str]]:
    found = {str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f) if forbidden(m)) for f in files}
    return {f: m for f, m in found.items() if m}


def test_data_modules_never_import_foundv2():
    assert _offenders((ROOT / "data_modules").rglob("*.py"), lambda m: m.split(".")[0] == "foundv2") == {}


def test_only_the_command_imports_the_cli():
    files = [f for d in ("foundv2", "data_modules", "tests", "benchmarks", "research") for f in (ROOT / d).rglob("*.py")]
    # the command itself, and the tests of its exit codes (they call main() in-process)
    allowed = {ROOT / "foundv2" / "cli.py", ROOT / "foundv2" / "__main__.py", ROOT / "tests" / "test_bad_inputs.py",
               ROOT / "tests" / "test_integrity.py", ROOT / "tests" / "test_damaged_state.py"}
    assert len(files) > 20
    assert _offenders([f for f in files if f not in allowed], lambda m: m == "foundv2.cli") == {}


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from foundv2.io import x\n    import foundv2.cli\n")
    assert imported_modules(f) >= {"foundv2.io", "foundv2.cli"}
    f.write_text("from foundv2 import cli\n")
    assert "foundv2.cli" in imported_modules(f)
