"""MkDocs hooks: the pages generated from darkknowledge's registries and committed results.

``mkdocs.yml`` names this file under ``hooks:``. At every build (``mkdocs build``, ``mkdocs
serve``) it adds one page per registered loss, scheme and synthesiser, the catalog pages, and the
benchmark pages (``docs/dkdocs/``), and lists them in the nav; a page's ``<!-- readme-example:
NAME -->`` line becomes README's tested example of that name, and reStructuredText roles in the
docstrings that mkdocstrings renders (``:class:`~a.b.C```) become code. Nothing generated is
written into ``docs/``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from dkdocs import docstrings, readme, site  # noqa: E402  # found through the path set above (docs/ is not a package)


def on_config(config: Any) -> Any:
    site.extend_nav(config["nav"], ROOT)
    return config


def on_files(files: Files, config: Any) -> Files:
    for path, content in site.generated(ROOT).items():
        if isinstance(content, Path):
            files.append(File.generated(config, path, abs_src_path=str(content)))
        else:
            files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    return readme.include(markdown, ROOT)


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    return docstrings.html_roles(html)
