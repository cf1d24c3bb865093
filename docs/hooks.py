"""mkdocs hooks: pages made from the code and the results, so the site cannot drift from either.

- `<!-- cli-reference -->` in a page becomes the help of `hf-soup` and of every verb, from `hf_soup.cli.build_parser()`.
- `<!-- readme -->` (the home page) becomes the README, its `docs/` links made relative to the site and its pitch
  before its two commands.
- `results/*.md` and `results/*.json` of the repository are served under `results/`, as the scripts wrote them.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- cli-reference -->"
README = "<!-- readme -->"


def on_files(files, config):
    for path in sorted((ROOT / "results").glob("*")):
        if path.suffix in (".md", ".json"):
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    from hf_soup.cli import build_parser

    os.environ["COLUMNS"] = "88"  # argparse wraps to the terminal: the same width on every machine
    parser = build_parser()
    sections = ["## `hf-soup`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, verb in _verbs(parser).items():
        sections += [f"## `hf-soup {name}`", "", "```text", verb.format_help().rstrip(), "```", ""]
    return "\n".join(sections)


_DOCSTRING_TYPE = re.compile(r"<code>([^<]*`[^<]*)</code>")


def on_page_content(html, page, config, files):
    """The docstrings follow transformers' convention, ``name (`Type`, *optional*): ...``; mkdocstrings shows that
    type as written, so its Markdown marks are taken off here."""
    if "doc-section-item" not in html:
        return html
    return _DOCSTRING_TYPE.sub(
        lambda m: "<code>" + m.group(1).replace("`", "").replace("*optional*", "optional") + "</code>", html
    )


def readme() -> str:
    """The README for the site: the pitch first, then its two commands under "Try it", then the rest."""
    text = (ROOT / "README.md").read_text().replace("](docs/", "](")
    commands, pitch = text.split("\n---\n", 1)
    title, commands = commands.split("\n", 1)
    intro, rest = pitch.split("\n## ", 1)
    return f"{title}\n{intro}\n## Try it, offline\n{commands}\n## {rest}"


def on_page_markdown(markdown, page, config, files):
    if README in markdown:
        markdown = markdown.replace(README, readme())
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown
