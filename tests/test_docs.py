"""The README is the newcomer path and docs/ holds the reference: every link between them resolves, every docs
page is reachable from the README, and the README names the command CI runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def local_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_every_local_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in local_links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in local_links(REPO / "README.md")}
    orphans = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not orphans, orphans


def test_the_readme_stays_a_newcomer_path():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 200  # reference goes to docs/


def test_the_readme_names_the_command_ci_runs():
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"^{re.escape(commands[-1])} +# ", readme, re.MULTILINE), commands[-1]  # a line of "Two commands"


def test_the_longest_test_files_are_handed_out_first():
    """conftest's LONGEST_FIRST names real files, and the Makefile keeps xdist from reordering them by test count."""
    from tests.conftest import LONGEST_FIRST

    assert all((REPO / "tests" / name).is_file() for name in LONGEST_FIRST)
    pytest_line = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("PYTEST :="))
    assert "--dist loadfile --no-loadscope-reorder" in pytest_line
