"""The house rules that keep results honest and the code easy to change: every stage's dvc.yaml deps
cover each medkd module its command reaches through imports (and no more), imports run down the
layers (folders) one way, a cheap edit re-runs only the stages it affects, and the names say where
things are."""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medkd.config.configs import data_config

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
    for module in re.findall(r"-m (medkd[\w.]*)", cmd):
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
        # A package's __init__.py holds its docstring only (test below): editing it changes no result.
        needed = {str(module_file(m).relative_to(REPO)) for m in closure(roots) if module_file(m).name != "__init__.py"}
        listed = {d for d in body["deps"] if str(d).startswith("medkd/")}
        if needed - listed:
            problems.append(f"stage {name!r} ({entry}) does not depend on {sorted(needed - listed)}")
        if listed - needed:
            problems.append(f"stage {name!r} ({entry}) lists {sorted(listed - needed)}, which it never imports")
    return problems


def test_every_stage_depends_on_the_modules_its_notebook_imports():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert stage_deps_problems(dvc) == []


def test_packages_hold_nothing_but_their_docstring():
    for init in PACKAGE.rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), init


def test_the_deps_check_notices_a_missing_module():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = dvc["stages"]["teacher"]["do"]["deps"]
    deps.remove("medkd/engine/losses.py")
    assert stage_deps_problems(dvc) == [
        "stage 'teacher' (python -m medkd.pipeline.runner + notebooks/02_teacher.ipynb) does not depend on "
        "['medkd/engine/losses.py']"]


def test_every_stage_waits_for_the_params_check():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "-m medkd.stages.check " in dvc["stages"]["check"]["cmd"]
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
    """Except in the command line, whose commands import their code when they run (a fast `medkd --help`);
    it is no stage's command, so no DVC dependency hides there."""
    hidden = []
    for module in all_modules():
        if module == "medkd.cli":
            continue
        tree = ast.parse(module_file(module).read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            if medkd_imports(func):
                hidden.append(f"{module}.{func.name}")
    assert hidden == []


# The layers, lowest first: a module imports modules of its own layer or of lower ones only.
LAYERS = (("util",), ("catalog",), ("config",), ("data", "models", "scoring"), ("engine", "deploy", "reporting"),
          ("pipeline",), ("stages",), ("cli", "__main__", "demo", "experiments"))


def layer_of(module: str) -> int:
    folder = module.split(".")[1]
    return next(rank for rank, names in enumerate(LAYERS) if folder in names)


def test_imports_run_down_the_layers():
    upward = [f"{module} -> {dep}" for module in all_modules() if module != "medkd"
              for dep in module_imports(module) if layer_of(dep) > layer_of(module)]
    assert upward == []
    # Folders of one layer stay apart where the layer's point is independence.
    for module in all_modules():
        if module.startswith("medkd.deploy"):
            assert not {m for m in closure({module}) if m.startswith(("medkd.engine", "medkd.reporting"))}, module
        if module.startswith("medkd.reporting"):
            assert not {m for m in closure({module}) if m.startswith(("medkd.engine", "medkd.deploy"))}, module


def test_only_stage_modules_in_stages_each_named_after_its_dvc_stage():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__"}
    # export-teacher and export share one module: both export a trained model.
    assert modules == {name.split("-")[0] for name in dvc["stages"]}
    variables = {k: v for entry in dvc.get("vars", []) if isinstance(entry, dict) for k, v in entry.items()}
    for name, stage in dvc["stages"].items():
        _, roots = stage_entry_modules(stage.get("do", stage), variables)
        assert f"medkd.stages.{name.split('-')[0]}" in roots, name


def test_no_two_modules_share_a_file_name():
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    packages = [p.parent.name for p in PACKAGE.rglob("__init__.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
    assert sorted(set(packages) & {n.removesuffix(".py") for n in names}) == []


def test_no_function_is_long_or_takes_many_parameters():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                count += bool(args.vararg) + bool(args.kwarg) - (bool(args.args) and args.args[0].arg in ("self", "cls"))
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 or count > 10:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines, {count} parameters")
    assert found == []


def stages_reading(dvc: dict, file: str) -> list[str]:
    """The DVC stages that re-run when `file` changes (those that list it among their deps)."""
    return [name for name, stage in dvc["stages"].items() if file in stage.get("do", stage)["deps"]]


# What an edit re-runs (docs/design.md states the same table): the cheap edits stay cheap.
RERUNS = {
    "medkd/reporting/tables.py": ["report"],  # results-page wording
    "medkd/reporting/page.py": ["report"],  # results-page layout
    "medkd/reporting/figures.py": ["report"],  # a figure
    "medkd/engine/losses.py": ["teacher", "distill", "search"],  # a loss term (no export stage)
    "medkd/engine/loop.py": ["teacher", "distill", "search"],  # the training loop
    "medkd/config/schema.py": ["check"],  # the schema (its stamp does not change: nothing downstream re-runs)
    "medkd/deploy/onnx_export.py": ["export-teacher", "export"],  # the export
}


def test_an_edit_re_runs_only_the_stages_that_run_it():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert {file: stages_reading(dvc, file) for file in RERUNS} == RERUNS
    section = (REPO / "docs" / "design.md").read_text().split("## What an edit re-runs", 1)[1].split("\n## ", 1)[0]
    for file, stages in RERUNS.items():
        row = next((line for line in section.splitlines() if f"`{file}`" in line), None)
        assert row is not None, f"docs/design.md's re-run table lacks {file}"
        assert row.split("|")[-2].strip() == ", ".join(f"`{s}`" for s in stages), file


def test_the_predict_command_and_the_check_load_no_training_code(tmp_path):
    """`medkd predict` loads the export's code only; `medkd --help` and `medkd check-params` load no torch."""
    probe = ("import sys, runpy; sys.argv = {argv!r}; "
             "import importlib; importlib.import_module({module!r}); "
             "print(' '.join(sorted(m for m in sys.modules if m.startswith(('medkd', 'torch')))))")
    loaded = subprocess.run([sys.executable, "-c", probe.format(argv=["x"], module="medkd.deploy.predictor")],
                            capture_output=True, text=True, check=True).stdout.split()
    training = [m for m in loaded if m.startswith(("medkd.engine", "medkd.stages", "medkd.reporting"))]
    assert training == [] and "medkd.models.checkpoint" in loaded
    for module in ("medkd.cli", "medkd.stages.check"):
        loaded = subprocess.run([sys.executable, "-c", probe.format(argv=["x"], module=module)],
                                capture_output=True, text=True, check=True).stdout.split()
        assert not [m for m in loaded if m.startswith("torch")], module
    # A fresh clone has no data/ yet: the check runs on a copy of params.yaml beside stand-in data folders.
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dataset in params["data"]:
        cfg = data_config(params, dataset, tmp_path)
        Path(cfg.root).mkdir(parents=True, exist_ok=True)
        (Path(cfg.root) / cfg.spec.marker).touch()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "medkd", "check-params", "--params",
                           str(tmp_path / "params.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert " torch" not in done.stderr


def test_design_docs_module_map_names_every_module():
    readme = (REPO / "docs" / "design.md").read_text()
    section = readme.split("## Module map", 1)[1].split("\n## ", 1)[0]
    for package in sorted({p.parent for p in PACKAGE.rglob("__init__.py")}):
        assert f"`{package.relative_to(REPO)}/`" in section, f"docs/design.md's module map lacks {package}/"
    for module in all_modules():
        path = module_file(module)
        if path.name == "__init__.py":
            continue
        path = str(path.relative_to(REPO))
        assert f"`{path}`" in section, f"docs/design.md's module map lacks {path}"
        line = next(line for line in section.splitlines() if f"`{path}`" in line)
        imports = sorted(str(module_file(m).relative_to(PACKAGE)).removesuffix(".py")
                         for m in module_imports(module) if module_file(m).name != "__init__.py")
        stated = line.split("→", 1)[1].split("|")[0] if "→" in line else ""
        stated = sorted(w.strip(" `") for w in stated.split(",") if w.strip(" `-—"))
        assert stated == imports, f"{path}: docs/design.md says it imports {stated}, the code imports {imports}"
