"""The docs hold: every relative link resolves, every mcc-* flag they show exists, docs/bundle.md matches the schema."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# console script -> the module that provides its main()
COMMANDS = {
    "mcc-train": ["mcc_train.cli"],
    "mcc-export": ["export.cli"],
    "mcc-eval": ["export.eval_cli"],
    "mcc-predict": ["mcc_serve.predict_cli"],
    "mcc-serve": ["mcc_serve.cli"],
}
PYTHON_MODULES = {"mcc_train": "mcc-train", "export": "mcc-export", "mcc_serve": "mcc-serve"}  # python -m X

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?")  # [label]: target, not inside a paragraph
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)
# an mcc command where a shell would run it: after start, space, a path, a quote or a paren; then a space or the end
COMMAND = re.compile(
    r"(?:(?<=^)|(?<=[\s/(\"'`]))(?:(" + "|".join(COMMANDS) + r")|-m\s+(" + "|".join(PYTHON_MODULES) + r"))(?=\s|$)"
)
SEPARATOR = re.compile(r"\s#|\|\|?|&&|;|\s&(?:\s|$)")  # a comment or the next command ends a command line
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def without_code(text: str) -> str:
    return INLINE_CODE.sub(" ", FENCE.sub("", text))


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def code_snippets(text: str) -> list[tuple[int, str]]:
    """(line, logical line) for every line of every fenced block, continuations joined, and every inline code span."""
    snippets = []
    for block in FENCE.finditer(text):
        start = line_of(text, block.start())
        body = block.group(0).split("\n")[1:-1]
        joined, first = "", None
        for i, line in enumerate(body):
            first = start + 1 + i if first is None else first
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            snippets.append((first, joined + line))
            joined, first = "", None
    for span in INLINE_CODE.finditer(FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)):
        snippets.append((line_of(text, span.start()), span.group(2)))
    return snippets


def command_flags(page: Path) -> list[tuple[str, str, str]]:
    """(command, flag, where) for every --flag written on an mcc-* command line in ``page``'s code."""
    found = []
    text = page.read_text()
    for line, snippet in code_snippets(text):
        for match in COMMAND.finditer(snippet):
            command = match.group(1) or PYTHON_MODULES[match.group(2)]
            rest = snippet[match.end() :]
            rest = rest[: m.start()] if (m := SEPARATOR.search(rest)) else rest
            where = f"{page.relative_to(ROOT)}:{line}"
            found += [(command, flag.split("=")[0], where) for flag in FLAG.findall(rest)]
    return found


def console_command(name: str) -> list[str]:
    """How to run console script ``name``: the one installed beside this Python, else its module's main()."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    if found := shutil.which(name, path=str(Path(sys.executable).parent)):
        return [found]
    module = next((m for m in COMMANDS[name] if importlib.util.find_spec(m) is not None), COMMANDS[name][-1])
    return [sys.executable, "-c", f"import sys, {module} as m; sys.argv[0] = {name!r}; sys.exit(m.main())"]


@cache
def help_flags(name: str) -> frozenset[str]:
    """Every --flag that ``name --help`` prints (run once per session)."""
    out = subprocess.run(
        [*console_command(name), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, f"{name} --help failed:\n{out.stderr[-2000:]}"
    return frozenset(FLAG.findall(out.stdout))


def github_anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes for ``page``."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def reference_targets(text: str) -> list[str]:
    """Targets of reference definitions: a ``[label]: target`` line that does not continue a paragraph."""
    targets, previous = [], ""
    for line in text.split("\n"):
        match = REFERENCE.match(line)
        if match and (not previous.strip() or REFERENCE.match(previous)):
            targets.append(match.group(1))
        previous = line
    return targets


def page_links(page: Path) -> list[str]:
    text = without_code(page.read_text())
    return [*LINK.findall(text), *reference_targets(text), *HTML_SRC.findall(text)]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in page_links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no {resolved})")
        elif fragment and resolved.suffix == ".md" and fragment not in github_anchors(resolved):
            broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{fragment} in {resolved.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_checker_sees_links():
    assert len(page_links(ROOT / "README.md")) >= 5, "README.md links into docs/; the link parser found almost none"


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_flags_exist(command):
    uses = [(flag, where) for page in PAGES for cmd, flag, where in command_flags(page) if cmd == command]
    assert uses, f"the docs show no {command} command line with flags; the parser or the docs lost them"
    known = help_flags(command)
    unknown = [
        f"{where}: {command} {flag}"
        for flag, where in uses
        if flag not in known and not (flag.startswith("--no-") and "--" + flag.removeprefix("--no-") in known)
    ]
    assert unknown == [], f"flags the docs show that `{command} --help` does not list: {unknown}"


def test_bundle_page_matches_schema():
    spec = importlib.util.spec_from_file_location("bundle_doc", ROOT / "scripts" / "bundle_doc.py")
    bundle_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle_doc)
    page = ROOT / "docs" / "bundle.md"
    assert page.read_text() == bundle_doc.render(), "docs/bundle.md is out of date: run python scripts/bundle_doc.py"
