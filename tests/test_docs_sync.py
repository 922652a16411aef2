"""The reference tables agree with the code: settings, error codes and routes, both ways.

- docs/configuration.md's settings table has one row per field of `handler.settings.Settings`;
- its error table lists every `code` the handler can answer with (every `code=` string given to an
  error in handler/, every parameter default named `code`, every kind's default code), each kind's
  row with that kind's HTTP status and v2 code;
- docs/api.md's route table has one row per (method, path) the app serves.
And every relative link in README.md and docs/*.md points at a file that exists (and, within
Markdown pages, at a heading that exists).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fastapi.routing import APIRoute
from markdown_it import MarkdownIt

from handler.app import create_app
from handler.errors import DEFAULT_CODE, STATUS, V2_CODE
from handler.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TICKED = re.compile(r"`([^`]+)`")
CODE = re.compile(r"[a-z][a-z0-9_]*")  # an error code, not a setting or path beside it


def section(page: Path, heading: str) -> str:
    text = page.read_text()
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ", 1)[0]
    rest = text[start + len(heading) + 2 :]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header row


# ---- settings ------------------------------------------------------------------------------------


def documented_settings() -> set[str]:
    rows = table_rows(section(ROOT / "docs" / "configuration.md", "## Settings"))
    return {TICKED.findall(row[0])[0] for row in rows if TICKED.findall(row[0])}


def test_every_setting_is_documented_and_every_documented_one_exists() -> None:
    in_code = {name.upper() for name in Settings.model_fields}
    documented = documented_settings()
    assert in_code - documented == set(), "settings missing from docs/configuration.md"
    assert documented - in_code == set(), "docs/configuration.md lists settings the code lacks"


# ---- error codes ---------------------------------------------------------------------------------


def codes_in_handler() -> set[str]:
    """Every literal error code in handler/: `code="..."` arguments and `code` defaults."""
    codes = set(DEFAULT_CODE.values())
    for path in (ROOT / "handler").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    value = kw.value
                    if kw.arg == "code" and isinstance(value, ast.Constant):
                        codes |= {value.value} if isinstance(value.value, str) else set()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                positional = a.args[len(a.args) - len(a.defaults) :]
                pairs = [*zip(positional, a.defaults, strict=True)]
                pairs += [*zip(a.kwonlyargs, a.kw_defaults, strict=True)]
                for arg, default in pairs:
                    if arg.arg == "code" and isinstance(default, ast.Constant):
                        codes |= {default.value} if isinstance(default.value, str) else set()
    return codes


def error_table() -> list[tuple[int, set[str], int]]:
    """(HTTP status, codes, v2 code) per row of docs/configuration.md's error table."""
    rows = table_rows(section(ROOT / "docs" / "configuration.md", "## Errors"))
    return [
        (int(row[1]), set(filter(CODE.fullmatch, TICKED.findall(row[3]))), int(row[4].strip("`")))
        for row in rows
    ]


def test_every_error_code_is_documented_and_every_documented_one_exists() -> None:
    in_code = codes_in_handler()
    documented = set().union(*(codes for _, codes, _ in error_table()))
    assert in_code - documented == set(), "error codes missing from docs/configuration.md"
    assert documented - in_code == set(), "docs/configuration.md lists codes the code lacks"


def test_each_kind_row_has_its_status_and_v2_code() -> None:
    table = error_table()
    for kind, code in DEFAULT_CODE.items():
        (row,) = [(status, v2) for status, codes, v2 in table if code in codes]
        assert row == (STATUS[kind], V2_CODE[kind]), f"{kind.name}: {code}"


# ---- routes --------------------------------------------------------------------------------------


def served_routes() -> set[tuple[str, str]]:
    app = create_app(Settings())
    routes: list[APIRoute] = list(app.state.api_routes)
    served = {(m, r.path_format) for r in routes for m in r.methods}
    # The interactive docs and the OpenAPI document, which FastAPI itself adds.
    for route in app.routes:
        path = getattr(route, "path", None)
        if path in ("/docs", "/openapi.json"):
            served |= {(m, path) for m in getattr(route, "methods", ())}
    return served


def documented_routes() -> set[tuple[str, str]]:
    rows = table_rows(section(ROOT / "docs" / "api.md", "## Routes"))
    return {(m, TICKED.findall(row[1])[0]) for row in rows for m in TICKED.findall(row[0])}


def test_every_route_is_documented_and_every_documented_one_is_served() -> None:
    served, documented = served_routes(), documented_routes()
    assert served - documented == set(), "routes missing from docs/api.md's route table"
    assert documented - served == set(), "docs/api.md lists routes the app does not serve"


# ---- links ---------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    tokens = MarkdownIt().parse(page.read_text())
    found: set[str] = set()
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            base = slug(tokens[i + 1].content)
            name, n = base, 0
            while name in found:  # repeated headings get -1, -2, ...
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def links(page: Path) -> list[str]:
    found = []
    for token in MarkdownIt().parse(page.read_text()):
        for child in token.children or ():
            if child.type == "link_open":
                found.append(str(child.attrs["href"]))
            if child.type == "image":
                found.append(str(child.attrs["src"]))
    return found


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for href in links(page):
            if re.match(r"[a-z]+:", href):
                continue  # https:, mailto:
            target, _, anchor = href.partition("#")
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {href} (no file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {href} (no heading)")
    assert broken == []


def test_the_link_check_sees_links() -> None:
    """A parser that found nothing would pass the check above vacuously."""
    readme = links(ROOT / "README.md")
    assert "docs/api.md" in readme and "bench/results/latest.png" in readme
