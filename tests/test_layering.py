"""The dependency arrows point one way: ``service/`` and ``training/`` use ``ranker/``; nothing
in ``ranker/`` uses them, and the service's app and reloader do not import each other.

Imports are read with ``ast`` from the source (top-level, inside functions and under
``TYPE_CHECKING`` alike), so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from ranker import cli

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against its package (by
    default, the one its place in the repository says)."""
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def top_packages(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_imported_modules_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from service.app import create_app\n"
        "def f():\n    import training.loop\n    from . import errors\n"
    )
    found = imported_modules(probe, "ranker")
    assert {"service.app", "training.loop", "ranker", "ranker.errors"} <= found


RANKER_MODULES = sorted((ROOT / "ranker").rglob("*.py"))


@pytest.mark.parametrize(
    "path", RANKER_MODULES, ids=[str(p.relative_to(ROOT)) for p in RANKER_MODULES]
)
def test_no_module_in_ranker_imports_training_or_service(path: Path) -> None:
    wrong = top_packages(imported_modules(path)) & {"training", "service"}
    assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}: ranker/ is the core"


def test_service_app_and_reload_do_not_import_each_other() -> None:
    """The app wires the reloader in (app -> reload); the reloader swaps ``ServingState``
    (service/state.py) without reaching back into the app."""
    app = imported_modules(ROOT / "service" / "app.py")
    reload = imported_modules(ROOT / "service" / "reload.py")
    assert not {"service.app", "service.app.ServingState"} & reload, "service/reload.py imports app"
    assert not ("service.reload" in app and "service.app" in reload)


def test_entry_points_and_builtin_command_list_agree() -> None:
    """pyproject.toml's ``ranker.commands`` group and the fallback list name the same modules,
    so the command has the same subcommands whether the metadata is installed or not."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][cli.ENTRY_POINT_GROUP]
    assert sorted(v.split(":")[0] for v in declared.values()) == sorted(cli.BUILTIN_COMMANDS)
    assert all(v.endswith(":register") for v in declared.values())


JOBS = {
    "generate",
    "train",
    "evaluate",
    "export",
    "serve",
    "push-features",
    "build-log",
    "ab-report",
    "push-state",
    "tune",
    "report",
}


def subcommands() -> set[str]:
    parser = cli.build_parser()
    return set(next(a for a in parser._actions if a.dest == "command").choices)


def test_every_job_is_a_subcommand_with_or_without_entry_points(monkeypatch) -> None:  # noqa: ANN001
    assert subcommands() == JOBS  # whatever this environment has installed
    monkeypatch.setattr(cli, "entry_points", lambda group: [])  # metadata without the group
    assert subcommands() == JOBS


def test_an_installed_entry_point_adds_a_subcommand(monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    """Real package metadata on sys.path: a distribution declaring the group adds its command
    (and declares one of the project's own modules again, which is registered once)."""
    dist = tmp_path / "probe_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{cli.ENTRY_POINT_GROUP}]\nprobe = probe_cmd:register\nservice = service.cli:register\n"
    )
    (tmp_path / "probe_cmd.py").write_text(
        "def register(sub):\n    sub.add_parser('probe').set_defaults(func=lambda a: None)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert subcommands() == JOBS | {"probe"}
