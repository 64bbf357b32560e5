"""Each method is known in one place, `camserve.export.methods.METHODS`: the README's methods table,
DEPLOYING's flag table, the CLI's help, the export flags and the tests' method lists must agree with it.

Method names all contain "cam", so a name in prose is recognised by that (less our package's name);
a stale or misspelt one fails here.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from camserve.export.methods import METHODS
from camserve.export.options import ExportOptions, add_arguments, channels_flag, from_args

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
METHOD_WORD = re.compile(r"\b(?!camserve)[a-z_]*cam[a-z_]*\b")  # gradcam, guided_gradcam, gradcampp, ...
SIGNATURE_SUFFIXES = ("_fused", "_smooth", "_bytes", "_compact")  # signatures named after a method


def method_of(name: str) -> str:
    """The method a signature name stands for: layercam_fused_bytes -> layercam."""
    while name.endswith(SIGNATURE_SUFFIXES):
        name = name.rsplit("_", 1)[0]
    return name


def section(markdown: str, heading: str) -> str:
    """The text under `heading` down to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = markdown.index(f"\n{heading}\n")
    end = re.search(rf"\n#{{1,{len(level)}}} ", markdown[start + 1:])
    return markdown[start:start + 1 + end.start()] if end else markdown[start:]


def tables(markdown: str) -> list[list[list[str]]]:
    """Each markdown table as rows of cells, header first, the |---| line left out."""
    found, rows = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set("-: ") for cell in cells):
                rows.append(cells)
        elif rows:
            found.append(rows)
            rows = []
    return found


def table_with(markdown: str, header: list[str]) -> list[list[str]]:
    [table] = [t for t in tables(markdown) if t[0] == header]
    return table[1:]


def code(cell: str) -> list[str]:
    """The `code` spans of a cell."""
    return re.findall(r"`([^`]+)`", cell)


def channel_flags() -> dict[str, tuple[str, int]]:
    """method -> (its flag --<method>-channels, the flag's default), for each method with a channel limit."""
    return {name: (channels_flag(name), m.channel_limit.default) for name, m in METHODS.items() if m.channel_limit}


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_readme_methods_table_has_one_row_per_method_in_registry_order():
    readme = (ROOT / "README.md").read_text()
    rows = table_with(section(readme, "## Methods"), ["method", "channel weighting, in words", "cost beyond predict",
                                                      "use it when"])
    named = [code(row[0])[0] for row in rows]
    assert [n for n in named if not n.startswith("<method>_")] == list(METHODS)
    for method, (flag, default) in channel_flags().items():  # a method with a channel limit names its flag
        [row] = [row for row in rows if code(row[0])[0] == method]
        assert f"`{flag}`" in row[2] and str(default) in row[2], row


def test_method_names_in_the_docs_tables_are_registry_methods():
    for doc in ("README.md", "docs/DEPLOYING.md", "docs/SIGNATURES.md"):
        for table in tables((ROOT / doc).read_text()):
            for cell in (cell for row in table for cell in row):
                for name in METHOD_WORD.findall(cell):
                    assert method_of(name) in METHODS, f"{doc}: {name!r} in {cell!r}"


def test_deploying_flag_table_has_the_registrys_channel_flags():
    deploying = (ROOT / "docs" / "DEPLOYING.md").read_text()
    rows = table_with(section(deploying, "## Export in detail"), ["flag", "meaning"])
    flags = {span for row in rows for span in code(row[0]) if span.startswith("--")}
    assert flags <= set(export_parser()._option_string_actions), flags  # no flag that does not exist
    assert {f for f in flags if f.endswith("-channels")} == {flag for flag, _ in channel_flags().values()}
    [methods_row] = [row for row in rows if code(row[0]) == ["--methods"]]
    copied = set(code(methods_row[1])) & (set(METHODS) - {"cam"})  # `cam` for its note on heads
    assert not copied, "the --methods row links README's table: it copies no list"


def test_export_flags_and_channels_come_from_the_registry():
    parser = export_parser()
    for method, (flag, default) in channel_flags().items():
        assert parser.get_default(parser._option_string_actions[flag].dest) == default
    defaults = dict(channel_flags().values())
    assert defaults["--scorecam-channels"] == defaults["--ablationcam-channels"] == 64  # as scripts and docs use
    options = ExportOptions(backbone="b", model_name="m", channels={"scorecam": 8})
    assert dict(options.channels) == {method: 8 if method == "scorecam" else default
                                      for method, (_, default) in channel_flags().items()}
    assert hash(options) == hash(ExportOptions(backbone="b", model_name="m", channels={"scorecam": 8}))
    with pytest.raises(ValueError, match="channel limits for methods without one: gradcam"):
        ExportOptions(backbone="b", model_name="m", channels={"gradcam": 8})
    parsed = from_args(parser.parse_args(["--backbone", "b", "--model-name", "m", "--ablationcam-channels", "3"]))
    assert dict(parsed.channels) == {"scorecam": 64, "ablationcam": 3}


def cli_texts() -> list[str]:
    """Every description, help and default of `python -m client` and its commands."""
    from camserve.client.__main__ import build_parser

    texts, parsers = [], [build_parser()]
    while parsers:
        parser = parsers.pop()
        texts.append(parser.description or "")
        for action in parser._actions:
            texts += [str(action.help or ""), str(action.default)]
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    return texts


def test_cli_help_names_registry_methods_only():
    named = {name for text in cli_texts() for name in METHOD_WORD.findall(text)}
    assert "gradcam" in named  # the --method default: the scan sees the help
    assert {method_of(name) for name in named} <= set(METHODS), named


def method_lists() -> dict[str, list[str]]:
    """The literal method lists of the tests: `parametrize("method", [...])` and constants named *METHODS,
    by where they are; names given by reference (`*METHODS`, `list(REFERENCES)`) are left out."""
    found = {}
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            literal = None
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "parametrize" and len(node.args) > 1:
                if isinstance(node.args[0], ast.Constant) and node.args[0].value == "method":
                    literal = node.args[1]
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "").endswith("METHODS") for t in node.targets):
                literal = node.value
            if isinstance(literal, (ast.List, ast.Tuple)):
                names = [e.value for e in literal.elts if isinstance(e, ast.Constant)]
                found[f"{path.name}:{node.lineno}"] = names
    return found


def test_test_method_lists_name_registry_methods():
    lists = method_lists()
    assert any(where.startswith("test_methods.py:") for where in lists)  # the scan finds the lists
    for where, names in lists.items():
        assert {method_of(n) for n in names} <= set(METHODS), (where, names)


def test_every_method_is_checked_against_its_formula():
    """In tests/test_methods.py: a numpy reference in REFERENCES, or a test of its own (test_<method>_...)."""
    import test_methods

    own = {m for m in METHODS if any(name.startswith(f"test_{m}_") for name in vars(test_methods))}
    assert set(test_methods.REFERENCES) <= set(METHODS)
    assert set(test_methods.REFERENCES) | own == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_method_names_are_what_the_scans_recognise(method):
    assert METHODS[method].name == method
    assert METHOD_WORD.fullmatch(method), "the scans of the docs and the help recognise a method by 'cam'"
