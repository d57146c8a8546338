"""The README and docs/ link to each other: every relative link names a file that exists and, with an
anchor, a heading in it (GitHub's anchor rules), so each moved section stays one click away."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but "-" and "_"), spaces to "-"."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    body = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", body, re.M)}


def relative_links(page: Path) -> list[str]:
    body = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(body) if not re.match(r"[a-z]+:", t)]


def test_anchor_follows_githubs_rules():
    assert anchor("Does ELDER reproduce?") == "does-elder-reproduce"
    assert anchor("What a run writes: `results.json`") == "what-a-run-writes-resultsjson"
    assert anchor("Scoring decisions (evidence: the authors' scripts)") == (
        "scoring-decisions-evidence-the-authors-scripts")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_its_file_and_heading(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    assert not broken, "\n".join(broken)
