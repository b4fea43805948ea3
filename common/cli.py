"""The ``onfh`` command: one prefix and a verb; each verb is an entry point of group ``onfh.verbs``.

The verbs are declared in pyproject.toml (``[project.entry-points."onfh.verbs"]``, ``verb =
"package.module:main"``), so this module, on the ground floor, names no package above it. A verb's
help line is the first line of its module's docstring, read without importing the module.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from pathlib import Path

GROUP = "onfh.verbs"
DISTRIBUTION = "onfh-fl"
# The order ``onfh --help`` lists verbs in: a hospital's path through the tool. Verbs not named
# here (a plugin's) follow in alphabetical order.
ORDER = (
    "synth",
    "check",
    "simulate",
    "train",
    "predict",
    "evaluate",
    "adapt",
    "provision",
    "server",
    "site",
    "run",
)


def plain(text: str) -> str:
    """reStructuredText made readable in a terminal: ````x```` and ``:func:`x``` become ``x``, ``::`` ``:``."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"::$", ":", text.replace("``", ""), flags=re.MULTILINE)


def description(doc: str | None, full: bool = False) -> str:
    """A module docstring as plain text for ``argparse``: its first paragraph, or all of it (``full``,
    for ``formatter_class=argparse.RawDescriptionHelpFormatter``)."""
    text = (doc or "").strip()
    return plain(text if full else text.split("\n\n")[0])


def verbs() -> dict[str, EntryPoint]:
    """Registered verbs in ``--help`` order (needs ``pip install -e .`` after pyproject changes)."""
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=GROUP):
        found.setdefault(point.name, point)  # the first installation on sys.path wins
    rank = {name: i for i, name in enumerate(ORDER)}
    return {name: found[name] for name in sorted(found, key=lambda n: (rank.get(n, len(ORDER)), n))}


def _module_file(module: str) -> Path | None:
    """The source file of ``module`` found without importing it (nor its parent packages)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return Path(spec.origin) if spec and spec.origin and not rest else None
    for base in spec.submodule_search_locations:
        path = Path(base).joinpath(*rest)
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def help_line(point: EntryPoint) -> str:
    """The first line of the verb's module docstring, without its ``onfh VERB ...:`` usage prefix."""
    path = _module_file(point.module)
    if path is None:
        return f"(module {point.module} is missing)"
    doc = ast.get_docstring(ast.parse(path.read_text(), filename=str(path))) or ""
    line = plain(doc.strip().splitlines()[0] if doc.strip() else "")
    line = re.sub(r"^onfh [^:]*:\s*", "", line).rstrip(".")
    return line[:1].upper() + line[1:]


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _usage(table: dict[str, EntryPoint]) -> str:
    lines = ["usage: onfh <command> [options]   (onfh <command> --help for its options)", "", "commands:"]
    lines += [f"  {verb:<10} {help_line(point)}" for verb, point in table.items()]
    if not table:
        lines.append(f"  (none registered: run 'pip install -e .' so that the {GROUP} entry points exist)")
    lines += ["", "options:", "  -h, --help     show this list", "  --version      show the version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``onfh VERB ARGS`` to the verb's ``main(ARGS)``; returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"onfh {_version()}")
        return 0
    table = verbs()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(table))
        return 0
    if argv[0] not in table:
        print(f"onfh: unknown command {argv[0]!r}\n", file=sys.stderr)
        print(_usage(table), file=sys.stderr)
        return 2
    point = table[argv[0]]
    try:
        verb_main = point.load()
    except ModuleNotFoundError as exc:
        if exc.name != point.module:
            raise  # a bug inside the verb's module: its traceback says where
        print(
            f"onfh: command {argv[0]!r} needs module {point.module}, which is missing: reinstall onfh-fl "
            "(pip install -e .)",
            file=sys.stderr,
        )
        return 2
    return int(verb_main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
