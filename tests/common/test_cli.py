"""The ``onfh`` prefix: finds its verbs as entry points, lists them in order, refuses unknown ones, and dispatches."""

import ast
from pathlib import Path

from common.cli import ORDER, help_line, main, plain, verbs

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_verb_in_order(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    table = verbs()
    assert list(table) == list(ORDER)  # every declared verb is registered, none is left out of ORDER
    positions = [out.index(f"  {verb} ") for verb in ORDER]
    assert positions == sorted(positions)
    assert "``" not in out


def test_help_lines_come_from_the_verbs_module_docstrings():
    point = verbs()["provision"]
    assert point.value == "server.provision:main"
    doc = ast.get_docstring(ast.parse((ROOT / "server" / "provision.py").read_text()))
    assert help_line(point).lower() in plain(doc.splitlines()[0]).lower()


def test_common_names_no_package_above_it():
    source = (ROOT / "common" / "cli.py").read_text()
    for package in ("simulation", "server.", "client."):
        assert f'"{package}' not in source


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("onfh 0.")


def test_plain_drops_rest_markup():
    assert (
        plain("``onfh site``: see :func:`client.daemon.main` and::")
        == "onfh site: see client.daemon.main and:"
    )


def test_unknown_verb_is_refused(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_dispatch_reaches_the_verb(capsys, tmp_path):
    # `onfh check` on a missing folder: a one-line message and exit code 1, no traceback.
    assert main(["check", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
