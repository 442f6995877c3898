"""What the documentation says, for the tests that hold it to the code: README.md and every
docs/*.md page (their text, a section under a heading, their links, the commands they show)."""

from __future__ import annotations

import glob
import os
import re
import shlex
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def doc_paths(root: str = ROOT) -> list[str]:
    """README.md, then docs/*.md, relative to the repository root."""
    pages = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
    return ["README.md", *pages]


def doc_texts(root: str = ROOT) -> dict[str, str]:
    """{relative path: text} for README.md and docs/*.md."""
    out = {}
    for rel in doc_paths(root):
        with open(os.path.join(root, rel), encoding="utf-8") as fh:
            out[rel] = fh.read()
    return out


def headings(text: str) -> list[str]:
    """The markdown headings of a page (a `# comment` inside a code block is no heading)."""
    out, in_code = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            out.append(line.lstrip("#").strip())
    return out


def doc_section(heading: str, root: str = ROOT) -> str:
    """The section that starts with `heading` (e.g. "## 课程的命令行") in README.md or a docs page, up
    to the next heading of its level or above. Fails when no page has it."""
    level = len(heading.split(" ")[0])
    for rel, text in doc_texts(root).items():
        lines = text.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
        if not starts:
            continue
        section, in_code = [lines[starts[0]]], False
        for line in lines[starts[0] + 1:]:
            in_code ^= line.lstrip().startswith("```")
            hashes = len(line) - len(line.lstrip("#"))
            if not in_code and 0 < hashes <= level and line[hashes:hashes + 1] == " ":
                break
            section.append(line)
        return "\n".join(section)
    raise AssertionError(f"no page of README.md and docs/ has a heading starting with {heading!r}")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation and symbols dropped (CJK kept),
    spaces to hyphens."""
    kept = "".join(c for c in heading.lower()
                   if c in "-_ " or not unicodedata.category(c).startswith(("P", "S")))
    return kept.replace(" ", "-")


def relative_links(text: str) -> list[str]:
    """Targets of the markdown links and images of a page that point into the repository
    (http(s), mailto and the like are left out). Links inside code are not links."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def broken_links(root: str = ROOT) -> list[str]:
    """'page: target (why)' for every relative link of README.md and docs/*.md that does not
    resolve: a missing file, or an anchor that is not a heading of its page."""
    texts = doc_texts(root)
    bad = []
    for rel, text in texts.items():
        for target in relative_links(text):
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
            if not os.path.exists(os.path.join(root, dest)):
                bad.append(f"{rel}: {target} (no such file: {dest})")
                continue
            if anchor:
                if not dest.endswith(".md"):
                    bad.append(f"{rel}: {target} (an anchor into a file that is not markdown)")
                    continue
                with open(os.path.join(root, dest), encoding="utf-8") as fh:
                    anchors = {slug(h) for h in headings(fh.read())}
                if anchor not in anchors:
                    bad.append(f"{rel}: {target} (no heading of {dest} has the anchor #{anchor})")
    return bad


def shown_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, the words after it) for every `python X.py ...` or `torchrun ... X.py ...` a page
    shows, in code blocks and in inline code; continued lines (a trailing backslash) are joined,
    and a `# comment` ends a command."""
    text = re.sub(r"\\\n\s*", " ", text)
    snippets, in_code = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif in_code:
            snippets.append(line)
        else:
            snippets += re.findall(r"`([^`\n]+)`", line)
    out = []
    for snippet in snippets:
        for m in re.finditer(r"\b(?:python|torchrun)\b[^|;&#]*?(?<![\w/.-])((?:scripts/)?\w+\.py)\b([^|;&#]*)", snippet):
            out.append((m.group(1), words_of(m.group(2))))
    return out


def words_of(command: str) -> list[str]:
    """A command line split as a shell would (quotes kept together), or on spaces where a page's
    prose leaves a quote open."""
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()
