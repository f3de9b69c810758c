"""Code blocks of README.md and docs/*.md, and the ``docs-test`` comments on how to run them.

A fenced block may be preceded (blank lines allowed) by one HTML comment
``<!-- docs-test: CLAUSE; CLAUSE; ... -->``. The clauses:

    serve ARGS        run each curl line of the block against `torchpool serve ARGS`
    status N          ... and expect status N from each (default: any 2xx)
    env NAME=VALUE    ... with NAME set in the curl lines' environment
    setup FILE        ... after writing FILE (a photo, a sentence, a TorchScript model)
    output            this block (JSON) is the answer of the last curl line before it
    run               run every line of this block, in order, before any server starts
    file NAME         write this block to NAME before any server starts
    skip REASON       this block is not run (it needs the network, a GPU, a second host)
    copied from PATH  this table is a copy of rows of PATH

tests/test_docs_commands.py runs them; docs/development.md documents them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ROOT

TAG = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
CURL = re.compile(r"^\s*curl\s")


@dataclass
class Tag:
    serve: tuple[str, ...] | None = None
    status: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    output: bool = False
    run: bool = False
    file: str | None = None
    skip: str | None = None
    copied_from: str | None = None


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    tag: Tag | None
    # Output blocks that follow this one and show its last curl line's answer.
    outputs: list[Block] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def commands(self) -> list[str]:
        """Shell commands as written: a backslash-continued line or an open quote runs on
        into the next line. Comment lines and blank lines are left out."""
        commands: list[str] = []
        current: list[str] = []
        for line in self.text.splitlines():
            if not current and (not line.strip() or line.strip().startswith("#")):
                continue
            current.append(line.rstrip())
            text = "\n".join(current)
            if text.endswith("\\") or not _complete(text):
                continue
            commands.append(text.strip())
            current = []
        if current:
            commands.append("\n".join(current).strip())
        return commands

    def curl_lines(self) -> list[str]:
        return [c for c in self.commands() if CURL.match(c)]


def _complete(text: str) -> bool:
    """Whether ``text`` closes every quote it opens, as the shell reads it."""
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


def parse_tag(text: str, where: str) -> Tag:
    tag = Tag()
    for clause in filter(None, (c.strip() for c in text.split(";"))):
        word, _, rest = clause.partition(" ")
        rest = rest.strip()
        if word == "serve":
            tag.serve = tuple(shlex.split(rest))
        elif word == "status":
            tag.status = int(rest)
        elif word == "env":
            name, _, value = rest.partition("=")
            tag.env[name] = value
        elif word == "setup":
            tag.setup.append(rest)
        elif word == "output":
            tag.output = True
        elif word == "run":
            tag.run = True
        elif word == "file":
            tag.file = rest
        elif word == "skip":
            tag.skip = rest or "no reason given"
        elif word == "copied" and rest.startswith("from "):
            tag.copied_from = rest[len("from ") :].strip()
        else:
            raise ValueError(f"{where}: unknown docs-test clause {clause!r}")
    return tag


def pages() -> list[Path]:
    """README.md, then every page under docs/ (pages added later included)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one page, each with the docs-test comment before it, if any."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    pending: tuple[str, int] | None = None  # a tag's text and line, until its block
    i = 0
    while i < len(lines):
        line = lines[i]
        if match := TAG.match(line):
            if not match.group(1).strip().startswith("copied from"):  # a table's, not a block's
                pending = (match.group(1), i + 1)
        elif match := FENCE.match(line):
            indent, fence, lang = match.groups()
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence):
                end += 1
            body = "\n".join(
                item[len(indent) :] if item.startswith(indent) else item
                for item in lines[i + 1 : end]
            )
            where = f"{path.relative_to(ROOT)}:{i + 1}"
            tag = parse_tag(pending[0], where) if pending else None
            found.append(Block(path, i + 1, lang, body, tag))
            pending = None
            i = end
        elif pending and line.strip() and not line.lstrip().startswith("<!--"):
            # A comment that text separates from the next block applies to none.
            raise ValueError(
                f"{path.relative_to(ROOT)}:{pending[1]}: docs-test comment "
                "must come right before its fenced block"
            )
        i += 1
    _attach_outputs(found)
    return found


def _attach_outputs(found: list[Block]) -> None:
    served: Block | None = None
    for block in found:
        if block.tag and block.tag.output:
            if served is None:
                raise ValueError(f"{block.where}: an output block with no served block above")
            served.outputs.append(block)
        elif block.tag and block.tag.serve is not None:
            served = block


def parse_all() -> tuple[list[Block], list[str]]:
    """Every page's blocks, and the pages whose docs-test comments cannot be read."""
    found: list[Block] = []
    problems: list[str] = []
    for page in pages():
        try:
            found.extend(blocks(page))
        except ValueError as exc:
            problems.append(str(exc))
    return found, problems


def unfenced_curl_lines(path: Path) -> list[str]:
    """curl commands in indented code blocks, which the docs test cannot see: where they are."""
    lines = path.read_text().splitlines()
    inside: str | None = None
    found = []
    for number, line in enumerate(lines, 1):
        if match := FENCE.match(line):
            fence = match.group(2)
            if inside is None:
                inside = fence
            elif line.strip().startswith(inside):
                inside = None
            continue
        if inside is None and re.match(r"^ {4,}(\$ )?curl\s", line):
            found.append(f"{path.relative_to(ROOT)}:{number}")
    return found
