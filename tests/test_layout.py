"""The house rules that keep results honest: every stage's dvc.yaml deps cover each medkd module its
notebook reaches through imports, and imports inside medkd run one way (no cycles, no imports
hidden inside functions)."""

import ast
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "medkd"


def module_file(module: str) -> Path:
    path = REPO / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def medkd_imports(tree: ast.AST, current: str = "") -> set[str]:
    """The medkd modules an AST imports (`from medkd import x` counts x when x is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "medkd"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medkd":
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}").exists()}
    found = {m for m in found if module_file(m).exists()}
    # Importing medkd.a.b runs medkd/a/__init__.py too.
    for module in list(found):
        parts = module.split(".")
        found |= {".".join(parts[:i]) for i in range(2, len(parts))}
    return found - {current, "medkd"}


def module_imports(module: str) -> set[str]:
    return medkd_imports(ast.parse(module_file(module).read_text()), module)


def closure(modules: set[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += module_imports(module)
    return seen


def notebook_imports(path: Path) -> set[str]:
    cells = json.loads(path.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return medkd_imports(ast.parse(code))


def all_modules() -> list[str]:
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py"))


def stage_entry_modules(body: dict, variables: dict) -> tuple[str, set[str]]:
    """What a stage's command runs: its notebook's medkd imports, plus the module of `python -m medkd[.cli|.stages.runner]`."""
    roots, names = set(), []
    cmd = body["cmd"]
    for name, value in variables.items():
        cmd = cmd.replace("${" + name + "}", str(value))
    for module in ("medkd", "medkd.cli", "medkd.stages.runner"):
        if f" -m {module} " in f" {cmd} ":
            roots.add(f"{module}.__main__" if module == "medkd" else module)
            names.append(f"python -m {module}")
    notebook = next((str(d) for d in body["deps"] if str(d).startswith("notebooks/")), None)
    if notebook:
        roots |= notebook_imports(REPO / notebook)
        names.append(notebook)
    return " + ".join(names), roots


def stage_deps_problems(dvc: dict) -> list[str]:
    """For each stage: medkd modules its command reaches but dvc.yaml does not list, and listed ones it never reaches."""
    problems = []
    variables = {k: v for entry in dvc.get("vars", []) if isinstance(entry, dict) for k, v in entry.items()}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        entry, roots = stage_entry_modules(body, variables)
        needed = {str(module_file(m).relative_to(REPO)) for m in closure(roots)}
        listed = {d for d in body["deps"] if str(d).startswith("medkd/")}
        if needed - listed:
            problems.append(f"stage {name!r} ({entry}) does not depend on {sorted(needed - listed)}")
        if listed - needed:
            problems.append(f"stage {name!r} ({entry}) lists {sorted(listed - needed)}, which it never imports")
    return problems


def test_every_stage_depends_on_the_modules_its_notebook_imports():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert stage_deps_problems(dvc) == []


def test_the_deps_check_notices_a_missing_module():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = dvc["stages"]["teacher"]["do"]["deps"]
    deps.remove("medkd/losses.py")
    assert stage_deps_problems(dvc) == [
        "stage 'teacher' (python -m medkd.stages.runner + notebooks/02_teacher.ipynb) does not depend on "
        "['medkd/losses.py']"]


def test_every_stage_waits_for_the_params_check():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "check-params" in dvc["stages"]["check"]["cmd"]
    for name, stage in dvc["stages"].items():
        if name != "check":
            assert "reports/params.ok" in stage.get("do", stage)["deps"], name


def test_no_import_cycles_inside_medkd():
    graph = {m: module_imports(m) for m in all_modules()}
    state: dict[str, str] = {}

    def visit(module, trail):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_no_medkd_import_inside_a_function():
    hidden = []
    for module in all_modules():
        tree = ast.parse(module_file(module).read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            if medkd_imports(func):
                hidden.append(f"{module}.{func.name}")
    assert hidden == []


def test_engine_and_leaves_never_import_the_stage_side():
    for module in ("medkd.train", "medkd.models", "medkd.losses", "medkd.data", "medkd.datasets",
                   "medkd.metrics", "medkd.report", "medkd.backbones"):
        assert not {m for m in closure({module}) if m.startswith("medkd.stages")}, module
    assert "medkd.train" not in closure({"medkd.report"})


def test_design_docs_module_map_names_every_module():
    readme = (REPO / "docs" / "design.md").read_text()
    section = readme.split("## Module map", 1)[1].split("\n## ", 1)[0]
    for module in all_modules():
        if module == "medkd":
            continue
        path = str(module_file(module).relative_to(REPO))
        assert f"`{path}`" in section, f"docs/design.md's module map lacks {path}"
        line = next(line for line in section.splitlines() if f"`{path}`" in line)
        imports = sorted(str(module_file(m).relative_to(PACKAGE)).removesuffix(".py").replace("/__init__", "")
                         for m in module_imports(module) if m != "medkd.stages")
        stated = line.split("→", 1)[1].split("|")[0] if "→" in line else ""
        stated = sorted(w.strip(" `") for w in stated.split(",") if w.strip(" `-—"))
        assert stated == imports, f"{path}: docs/design.md says it imports {stated}, the code imports {imports}"
