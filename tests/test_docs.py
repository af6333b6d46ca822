"""The user docs (README.md, docs/*.md) stay inside the repository and free of work-tracking noise.

Rules:
- a relative link (markdown `[text](target)`) must resolve to a file or folder inside the
  repository, and an anchor (`#section`) to a heading of the target page;
- an absolute URL may appear only in README.md's "## Install" section, and only for a host (and
  path prefix) in ALLOWED_URLS;
- no doc names the team's internal contract (ARCHITECTURE.md), a path outside the repository
  (`../shared`, `/work/`), an issue ("issue", "#11"), or the hpcomm sources' docstrings do either;
- the README's test and API reference commands are the ones .ci/run runs;
- the python blocks of docs/DESIGN.md run (as tests/test_readme.py runs the README's).
"""

import pathlib
import re
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README] + sorted((ROOT / "docs").glob("*.md"))
DESIGN = ROOT / "docs" / "DESIGN.md"

# host -> path prefixes allowed under it ("" allows any path)
ALLOWED_URLS = {
    "pytorch.org": [""],
    "download.pytorch.org": ["/whl/"],
    "github.com": ["/NVIDIA/Megatron-LM"],
}

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s)>\]`\"']+", re.I)
FORBIDDEN = [
    (re.compile(r"ARCHITECTURE"), "the internal contract (link docs/DESIGN.md instead)"),
    (re.compile(r"\.\./shared|(?<![\w-])shared/"), "a path outside the repository"),
    (re.compile(r"/work/"), "a path outside the repository"),
    (re.compile(r"(?<![\w&/])#\d+\b"), "an issue or PR number"),
    (re.compile(r"\bissues?\b", re.I), "an issue"),
]


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def _section(text: str, title: str) -> str:
    """The text of the `## title` section, up to the next `## ` heading."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_resolve_inside_the_repository(doc):
    bad = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if URL.match(target) or target.startswith("mailto:"):
            continue  # absolute: test_absolute_urls_only_in_readme_install
        path, _, anchor = target.partition("#")
        dest = (doc.parent / urllib.parse.unquote(path)).resolve() if path else doc
        if not dest.is_relative_to(ROOT) or not dest.exists():
            bad.append(f"{target}: not a file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not bad, f"{_rel(doc)}: " + "; ".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_absolute_urls_only_in_readme_install(doc):
    text = doc.read_text()
    allowed_text = _section(text, "Install") if doc == README else ""
    bad = []
    for url in (u.rstrip(".,;:") for u in URL.findall(text)):
        parts = urllib.parse.urlsplit(url)
        host_ok = parts.scheme in ("http", "https") and any(
            parts.path.startswith(prefix) for prefix in ALLOWED_URLS.get(parts.hostname or "", []))
        if not host_ok:
            bad.append(f"{url}: host or path not in the allow-list")
        elif url not in allowed_text:
            bad.append(f"{url}: absolute URLs belong in README.md's Install section only")
    assert not bad, f"{_rel(doc)}: " + "; ".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_no_internal_references_or_issue_numbers(doc):
    bad = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for pattern, what in FORBIDDEN:
            if m := pattern.search(line):
                bad.append(f"line {number}: {m.group(0)!r} ({what})")
    assert not bad, f"{_rel(doc)}: " + "; ".join(bad)


def test_docstrings_do_not_point_outside_the_repository():
    """The API reference is generated from these files' docstrings."""
    bad = [f"{_rel(p)}: {pattern.pattern}" for p in sorted((ROOT / "hpcomm").rglob("*.py"))
           for pattern, _ in FORBIDDEN[:3] if pattern.search(p.read_text())]
    assert not bad


def test_design_page_is_linked_from_the_readme():
    assert DESIGN.exists()
    assert "](docs/DESIGN.md)" in README.read_text()


def test_ci_runs_the_readme_commands():
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    quick = re.findall(r"```bash\n(.*?)```", _section(text, "Quick start"), re.S)
    assert len(quick) == 2, "the Quick start has exactly two commands: the trainer and the tests"
    test_command = quick[1].strip()
    assert "pytest" in test_command and test_command in ci
    pdoc = [line.strip() for line in re.findall(r"```bash\n(.*?)```", _section(text, "Install"), re.S)
            for line in line.splitlines() if "pdoc" in line]
    assert len(pdoc) == 1 and any(line.startswith(pdoc[0]) for line in ci), pdoc


DESIGN_BLOCKS = re.findall(r"```python\n(.*?)```", DESIGN.read_text(), re.S) if DESIGN.exists() else []


@pytest.mark.parametrize("index", range(len(DESIGN_BLOCKS)))
def test_design_example(index):
    exec(compile(DESIGN_BLOCKS[index], f"docs/DESIGN.md python block {index}", "exec"), {})
