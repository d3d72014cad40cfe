"""The README and docs stay true: links resolve, cited result folders exist, the usage page is current,
the README stays a first hour, and the package's modules import one way (no cycle)."""

import ast
import re
from pathlib import Path

import pytest

from hwsearch.cli import build_parser, main, usage_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "bench" / "results" / "README.md"]


def test_the_readme_is_a_first_hour():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_or_folder(doc):
    text = doc.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve()
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            missing.append(target)
    assert not missing, f"{doc.name}: {missing}"


def _anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_result_folder_exists(doc):
    cited = set(re.findall(r"bench/results/[\w./-]*[\w-]", doc.read_text()))
    missing = [c for c in sorted(cited) if not (ROOT / c).exists()]
    assert not missing, f"{doc.name}: {missing}"


def test_the_usage_page_is_generated_from_the_parsers():
    assert (ROOT / "docs" / "usage.md").read_text() == usage_markdown(), \
        "docs/usage.md is stale: python -m hwsearch.cli > docs/usage.md"


def test_every_command_the_readme_names_has_help(capsys):
    readme = (ROOT / "README.md").read_text()
    named = sorted(set(re.findall(r"hwsearch (cost|models|run|apply|export|search|pareto)\b", readme)))
    assert named == sorted(build_parser()._subparsers._group_actions[0].choices)
    for command in named:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert f"usage: hwsearch {command}" in capsys.readouterr().out


def _imports(package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at any depth of the file: lazy imports count)."""
    names = {p.stem for p in (ROOT / package).glob("*.py")}
    graph = {}
    for path in (ROOT / package).glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith(f"{package}."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package}."))
        graph[path.stem] = {d for d in deps if d in names and d != path.stem}
    return graph


@pytest.mark.parametrize("package", ["hwsearch", "cost_models"])
def test_no_import_cycle(package):
    graph = _imports(package)
    graph.pop("__init__", None)  # the package re-exports; its modules never import it
    for deps in graph.values():
        deps.discard("__init__")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if not state.get(d):
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)
