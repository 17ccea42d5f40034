"""The documents a newcomer reads agree with the code: every module `docs/architecture.md` names
exists and every package is named there, its glossary defines the terms the docs use, and every
line of the troubleshooting table (docs/troubleshooting.md) is the message the bad-input matrix checks."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "robustlab"
ARCH = (REPO / "docs" / "architecture.md").read_text()
GLOSSARY_TERMS = (
    "stage",
    "subset",
    "survivors",
    "unit",
    "leader",
    "parent run",
    "exclusions",
    "plan",
    "worker",
)


def _packages() -> set[str]:
    return {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def _named_modules() -> set[str]:
    """Module paths (relative to robustlab/, without .py) the architecture page names: in
    backticks (`pkg/module`, `module.py`) and in the diagram's package rows."""
    names = set()
    for token in re.findall(r"`([a-z_]+(?:/[a-z_]+)*(?:\.py)?)`", ARCH):
        if ("/" in token or token.endswith(".py")) and not token.startswith("tests/"):
            names.add(token.removesuffix(".py").removeprefix("robustlab/"))
    diagram = ARCH.split("```")[1]
    names |= set(re.findall(r"\b([a-z_]+)\.py\b", diagram))
    for line in diagram.splitlines():
        m = re.match(r"\s*([a-z_]+)/\s+(.*?)(?:\s{2,}|$)", line)
        if m and m.group(1) in _packages():
            for mod in re.split(r"\s*·\s*", m.group(2).strip()):
                if re.fullmatch(r"[a-z_]+", mod):
                    names.add(f"{m.group(1)}/{mod}")
    return names


def test_every_module_the_architecture_page_names_exists():
    named = _named_modules()
    assert len(named) > 40  # the page really lists the modules
    missing = sorted(
        n
        for n in named
        if not (PACKAGE / f"{n}.py").is_file() and not (PACKAGE / n / "__init__.py").is_file()
    )
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_package_and_top_level_module_is_named():
    named = _named_modules()
    packages = {n.split("/")[0] for n in named if "/" in n}
    assert not _packages() - packages, sorted(_packages() - packages)
    top = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert not top - named, f"top-level modules missing from the page: {sorted(top - named)}"


def test_the_glossary_defines_the_terms():
    glossary = ARCH.split("## Glossary", 1)[1]
    defined = {m.lower() for m in re.findall(r"^- \*\*([^*]+)\*\*", glossary, re.M)}
    assert not set(GLOSSARY_TERMS) - defined, sorted(set(GLOSSARY_TERMS) - defined)


def test_the_troubleshooting_table_prints_what_the_bad_input_matrix_checks():
    from tests.test_bad_input import CASES

    table = (REPO / "docs" / "troubleshooting.md").read_text()
    rows = re.findall(r"^\| `robustlab ([^`]*)` \| (robustlab [^|]*?) \|$", table, re.M)
    assert len(rows) >= 20
    by_args = {" ".join(args): message for _, args, message in CASES}
    checked = 0
    for args, line in rows:
        message = by_args.get(args)
        if message is None:
            continue
        checked += 1
        fragment = message.split("…")[0]
        assert fragment in line.replace("\\|", "|"), (args, message, line)
    assert checked >= 15, f"only {checked} troubleshooting rows match a bad-input case"


def test_every_link_between_the_documents_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

    def anchors(text: str) -> set[str]:
        heads = re.findall(r"^#+ (.*)$", text, re.M)
        return {re.sub(r"[^a-z0-9 \-_]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)]*)\)", page.read_text()):
            if link.startswith(("http://", "https://")):
                continue
            path, _, frag = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if path.startswith("results/") and not target.exists():
                continue  # published by the experiment's run (results/cv-default)
            if (
                not target.exists()
                or frag
                and target.suffix == ".md"
                and frag not in anchors(target.read_text())
            ):
                broken.append(f"{page.name}: {link}")
    assert not broken, broken
