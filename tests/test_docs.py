"""README.md is an entry point into docs/: short, linking every page, every link resolving, its results
section quoting results/digits_table.md, and every `dd` option the README and docs show existing."""
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
MAX_README_LINES = 300
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _pages():
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))


def _anchors(text):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    out, code = set(), False
    for line in text.split("\n"):
        if line.startswith("```"):
            code = not code
        elif not code and re.match(r"#+ ", line):
            out.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return out


def _code_blocks(text):
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)


def test_readme_is_short_and_links_every_page():
    text = _read(README)
    n = text.count("\n")
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}: details go to docs/)"
    linked = {os.path.normpath(os.path.join(ROOT, t.split("#")[0])) for t in LINK.findall(text)}
    missing = [p for p in _pages()[1:] if os.path.normpath(p) not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_links_resolve():
    bad = []
    for page in _pages():
        for target in LINK.findall(_read(page)):
            if re.match(r"[a-z]+:", target):          # http(s):, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(dest):
                bad.append(f"{os.path.relpath(page, ROOT)}: {target} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(_read(dest)):
                bad.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_readme_quotes_the_results_table():
    spec = importlib.util.spec_from_file_location("run_table", os.path.join(ROOT, "tools", "run_table.py"))
    run_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_table)
    readme, table = _read(README), _read(run_table.TABLE)
    assert run_table.splice_readme(readme, table) == readme, (
        "README.md's results section differs from results/digits_table.md: "
        "re-quote it with tools/run_table.py's splice_readme")
    # the splice itself replaces what is between the markers, and only that
    other = run_table.splice_readme(readme, "# title\n\nnew table\n")
    assert "new table" in other and table.split("\n")[-2] not in other
    assert other.split(run_table.BEGIN)[0] == readme.split(run_table.BEGIN)[0]


def _dd_commands():
    """(page, verb words, set of --options) for every `dd ...` / `-m distilled_decoding ...` line in
    a bash block of the README or docs (continuation lines joined, comments dropped)."""
    out = []
    for page in _pages():
        for block in _code_blocks(_read(page)):
            for line in block.replace("\\\n", " ").split("\n"):
                line = line.split(" #")[0].strip()
                m = re.match(r"(?:\S*/)?(?:dd|torchrun .*?-m distilled_decoding)\s+(.*)", line)
                if m and not line.startswith("#"):
                    words = [w for w in m.group(1).split() if re.fullmatch(r"[a-z][a-z-]*", w)][:2]
                    out.append((os.path.relpath(page, ROOT), words, set(re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(1)))))
    return out


def test_documented_dd_options_exist():
    import click

    from distilled_decoding.cli import main

    commands = _dd_commands()
    assert len(commands) > 20, commands
    bad = []
    for page, words, opts in commands:
        cmd, path = main, []
        for w in words:
            if isinstance(cmd, click.Group) and w in cmd.commands:
                cmd = cmd.commands[w]
                path.append(w)
        if cmd is main:
            bad.append(f"{page}: dd {' '.join(words)}: no such verb")
            continue
        known = {o for p in cmd.params for o in p.opts + p.secondary_opts} | {"--help"}
        bad += [f"{page}: dd {' '.join(path)} {o}: no such option" for o in sorted(opts - known)]
    assert not bad, "\n".join(bad)


def test_layout_map_names_every_module():
    """The README's layout map lists every module of the two packages, and nothing that is gone."""
    text = _read(README)
    block = text[text.index("## Layout"):text.index("## Install")]
    named = set(re.findall(r"[\w/]+\.py|\b\w+/", block))
    missing = []
    for pkg in ("teachers", "distilled_decoding"):
        for f in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if f.endswith(".py") and f != "__main__.py" and f not in named and (pkg != "distilled_decoding" or f != "__init__.py"):
                missing.append(f"{pkg}/{f}")
    assert not missing, f"README's layout map does not mention {missing}"
    gone = [n for n in named if n.endswith(".py") and not any(
        os.path.exists(os.path.join(ROOT, d, n)) for d in ("teachers", "distilled_decoding", "tools"))]
    assert not gone, f"README's layout map names files that do not exist: {gone}"


def test_documented_python_names_exist():
    """Every `from distilled_decoding... import x` / `from teachers... import x` the pages show, and every
    project file path they name, exists."""
    import importlib

    bad = []
    for page in _pages():
        text = _read(page)
        for mod, names in re.findall(r"from ((?:distilled_decoding|teachers)[\w.]*) import ([\w, ]+)", text):
            try:
                m = importlib.import_module(mod)
            except ImportError as e:
                bad.append(f"{os.path.relpath(page, ROOT)}: {mod} ({e})")
                continue
            bad += [f"{os.path.relpath(page, ROOT)}: {mod}.{n}" for n in re.findall(r"\w+", names) if not hasattr(m, n)]
        for path in re.findall(r"`((?:distilled_decoding|teachers|tools|tests)/[\w/.{},-]*\w)`", text):
            if "{" not in path and not os.path.exists(os.path.join(ROOT, path)):
                bad.append(f"{os.path.relpath(page, ROOT)}: {path} (no such file)")
    assert not bad, "the docs name what does not exist:\n" + "\n".join(bad)
