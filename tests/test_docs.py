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
