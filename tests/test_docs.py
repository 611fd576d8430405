"""The README and docs/ say only what is true: every link resolves, every flag a command line shows
exists, every make target exists, and the pipeline picture is what `dvc dag` draws."""

import argparse
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(page):
    problems = []
    for target in links(page):
        if re.match(r"^(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert problems == [], problems


def command_lines(page: Path) -> list[str]:
    """Shell commands the page shows: the lines of its code blocks and its inline code spans."""
    text = page.read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    lines += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line.split(" #")[0].strip() for line in lines]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


@cache
def medkd_flags() -> dict[str, set[str]]:
    from medkd.cli import build_parser
    from medkd.config.presets import build_parser as preset_parser
    from medkd.deploy.predictor import build_parser as predict_parser
    from medkd.pipeline.runner import build_parser as run_stage_parser

    flags = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            flags |= {name: _options(sub) for name, sub in action.choices.items()}
    flags["predict"], flags["preset"] = _options(predict_parser()), _options(preset_parser())
    flags["run-stage"] = _options(run_stage_parser())
    return flags


@cache
def dvc_parser() -> argparse.ArgumentParser:
    from dvc.cli.parser import get_main_parser

    return get_main_parser()


def dvc_command(words: list[str]) -> tuple[str, set[str]]:
    """The dvc (sub)command that `words` (after `dvc`) name, and its options (DVC's own parser)."""
    parser, path = dvc_parser(), []
    for word in words:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if word.startswith("-") or sub is None or word not in sub.choices:
            break
        parser, path = sub.choices[word], path + [word]
    return " ".join(path), _options(parser)


def flag_problems(line: str) -> list[str]:
    if "&&" in line or ";" in line:
        return [p for part in re.split(r"&&|;", line) for p in flag_problems(part.strip())]
    try:
        words = shlex.split(line)
    except ValueError:
        return []
    while words and (words[0] in ("source", "exec") or "=" in words[0] and not words[0].startswith("-")):
        words = words[1:]
    if not words:
        return []
    tool = Path(words[0]).name
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    if tool == "medkd" or words[:3] in (["python", "-m", "medkd"], [str(BIN / "python"), "-m", "medkd"]):
        rest = words[1:] if tool == "medkd" else words[3:]
        known = medkd_flags().get(rest[0]) if rest else None
        if known is None:
            return [f"{line}: no medkd command {rest[:1]}"] if rest and not rest[0].startswith("-") else []
        return [f"{line}: medkd {rest[0]} has no {f}" for f in flags if f not in known]
    if tool == "dvc":
        command, known = dvc_command(words[1:])
        if not command and len(words) > 1 and not words[1].startswith("-"):
            return [f"{line}: no dvc command {words[1]}"]
        return [f"{line}: dvc {command} has no {f}" for f in flags if f not in known]
    if tool == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
        named = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        return [f"{line}: no make target {t}" for t in named if t not in targets]
    script = next((w for w in words if w.startswith("benchmarks/") and w.endswith(".py")), None)
    if script:
        source = (REPO / script).read_text() if (REPO / script).exists() else ""
        if not source:
            return [f"{line}: no {script}"]
        return [f"{line}: {script} has no {f}" for f in flags if f'"{f}"' not in source]
    return []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_line_shown_exists_with_its_flags(page):
    problems = [p for line in command_lines(page) for p in flag_problems(line)]
    assert problems == [], problems


def test_the_flag_check_notices_a_flag_that_does_not_exist():
    assert flag_problems("medkd check-params --params params.yaml") == []
    assert flag_problems("medkd check-params --parms params.yaml") != []
    assert flag_problems(".venv/bin/python benchmarks/trunk_depth.py --depths all 2 0") == []
    assert flag_problems(".venv/bin/python benchmarks/trunk_depth.py --depth all") != []
    assert flag_problems("make repro") == [] and flag_problems("make reproduce") != []
    assert flag_problems("dvc exp run -S 'a=1' --temp") == [] and flag_problems("dvc exp run --tmp") != []


def test_the_readme_pipeline_picture_is_what_dvc_dag_draws():
    drawn = subprocess.run([str(BIN / "dvc"), "dag", "--md"], capture_output=True, text=True, cwd=REPO, check=True)
    assert drawn.stdout.strip() in (REPO / "README.md").read_text()


def test_the_readme_stays_a_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_the_readme_says_what_it_is_and_its_two_commands_first():
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines[0].startswith("# medkd")
    first = [n for n, line in enumerate(lines) if line.startswith(("make repro", "make test"))]
    assert len(first) == 2 and max(first) < 40


def test_the_readmes_findings_are_the_results_pages():
    from medkd.reporting.page import findings, with_findings
    readme = (REPO / "README.md").read_text()
    results = (REPO / "reports" / "results" / "results.md").read_text()
    assert findings(results) and with_findings(readme, results) == readme, "run `medkd findings`"


def test_pages_name_no_issue_numbers():
    found = [f"{page.name}: {m.group(0)}" for page in PAGES
             for m in re.finditer(r"(?i)\b(issue \d+|the study issue|the issue)\b", page.read_text())]
    assert found == []


def params_statements(text: str) -> list[tuple[str, str]]:
    """`key.path: value` spans (code) whose key path starts at a section of params.yaml."""
    return re.findall(r"`((?:seed|seeds|runtime|data|teachers|students|distill|optuna|export)(?:\.[\w-]+)+): ([^`]+)`",
                      text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_params_value_a_page_states_is_params_yamls(page):
    import yaml

    from medkd.config.params import get_path
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    wrong = []
    for key, value in params_statements(page.read_text()):
        actual = get_path(params, key, None)
        if actual is None:
            continue  # a key the default leaves out (a preset's, or one whose default the page explains)
        if yaml.safe_load(value) != actual:
            wrong.append(f"{key}: the page says {value}, params.yaml has {actual!r}")
    assert wrong == []


def test_the_params_check_notices_a_wrong_value():
    assert params_statements("lr `teachers.medpix.train.lr: 1.05e-04`, `loss.kl.weight: 1`") == [
        ("teachers.medpix.train.lr", "1.05e-04")]


def test_the_committed_runs_stage_times_are_its_notebooks():
    """docs/reproducibility.md's table: each stage's seconds as papermill timed its rendered notebook."""
    import json
    section = (REPO / "docs" / "reproducibility.md").read_text().split("| stage | seconds | what |", 1)[1]
    rows = [line.split("|")[1:3] for line in section.split("\n\n", 1)[0].splitlines()[2:]]
    durations = {p.stem: json.loads(p.read_text())["metadata"]["papermill"]["duration"]
                 for p in (REPO / "reports" / "notebooks").glob("*.ipynb")}
    stated = {name.strip().replace("@", "-"): int(seconds.strip().replace(",", "")) for name, seconds in rows[:-1]}
    assert stated == {name: round(seconds) for name, seconds in durations.items()}
    assert rows[-1][1].strip().startswith(f"**{round(sum(durations.values())):,} (")


def path_templates() -> list[str]:
    """The paths the pipeline writes, with <placeholders>: Paths' own, and dvc.yaml's outputs."""
    import yaml

    from medkd.demo import DEMO
    from medkd.engine.trunks import trunk_file
    from medkd.pipeline.paths import Paths
    paths = Paths(Path("."))
    made = [paths.data_report("<d>"), paths.teacher_checkpoint("<d>"), paths.teacher_cache("<d>"),
            paths.teacher_report("<d>"), paths.probe_report("<d>"), paths.student_checkpoint("<s>", "<v>/seed-<n>"),
            paths.student_report("<s>"), paths.metrics("<m>"), paths.plot("<p>"), paths.export_model("<m>"),
            paths.export_report("<m>"), paths.search_report(), paths.search_models(), paths.results(), paths.state(),
            paths.resume("<r>"), paths.trunks(), paths.optuna_storage(), trunk_file(paths.trunks(), "<b>", "<n>", "<k>"),
            *(DEMO / name for name in ("run", "export", "cases.csv", "predictions.csv"))]
    outs = []
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        body = stage.get("do", stage)
        outs += [next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots")
                 for o in body.get(key, [])]
    return [str(p) for p in made] + [re.sub(r"\$\{[^}]+\}", "<x>", o) for o in outs]


def path_problems(page: Path) -> list[str]:
    """Paths under reports/, models/ or .medkd/ that a page names and that nothing writes or holds: each must
    be a path the pipeline writes (with its <placeholders>), a committed file, or a folder above one."""
    def pattern(path: str) -> str:
        return "^" + re.sub(r"<[^>]+>|\\\{[^}]*\\\}", "[^/]+", re.escape(path))
    from medkd.deploy import onnx_export
    export_files = [f"models/export/<m>/{name}" for name in (onnx_export.FP32, onnx_export.INT8,
                                                              onnx_export.PREPROCESSING, onnx_export.TOKENIZER_DIR)]
    templates = path_templates() + export_files
    exact = [re.compile(pattern(t) + "$") for t in templates]
    committed = subprocess.run(["git", "ls-files", "reports"], capture_output=True, text=True, cwd=REPO).stdout.split()
    problems = []
    for named in re.findall(r"`((?:reports|models|\.medkd)/[^`\s]*)`", page.read_text()):
        path = named.rstrip("/")
        if "/" not in path:
            continue  # the folder itself
        below = re.compile(pattern(path) + "(/.*)?$")  # the path, or a folder above what it matches
        if not (any(below.match(c) for c in committed + templates) or any(e.match(path) for e in exact)):
            problems.append(named)
    return problems


def test_the_path_check_notices_a_path_nothing_writes(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("`models/students/<student>/<variant>.pt`, `models/students/<student>/<variant>/seed-<s>.pt`, "
                    "`.medkd/resume/distill-<student>-<variant>-seed<s>.pt`, `reports/results/results.md`, "
                    "`models/export/<model>/model.onnx`, `reports/nowhere/`")
    assert path_problems(page) == ["models/students/<student>/<variant>.pt", "reports/nowhere/"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_a_page_names_is_written_by_the_pipeline(page):
    assert path_problems(page) == []
