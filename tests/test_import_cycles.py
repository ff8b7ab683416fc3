"""The import-graph check (tools/import_graph.py, run by `make check`): it finds a cycle in a
tree built to have one, in Python and in the dashboard's ES modules, and the repository has none."""

from pathlib import Path

import pytest

from tools.import_graph import JS_ROOTS, check, main

REPO = Path(__file__).resolve().parent.parent


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_python_cycle_through_a_function_local_relative_import_is_reported(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "services/__init__.py": "",
            "services/room/__init__.py": "",
            "services/room/a.py": "from services.room import b\n",
            "services/room/b.py": "def late() -> None:\n    from . import c\n",
            "services/room/c.py": "import services.room.a\n",
            "services/room/d.py": "from services.room.a import name\n",
        },
    )
    [cycle] = check(tmp_path)
    assert cycle.language == "python"
    assert cycle.path == tuple(f"services.room.{m}" for m in "abca")


def test_python_import_of_a_name_from_a_package_leads_to_its_init(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "deploy/__init__.py": "from deploy.run import main\n",
            "deploy/run.py": "from deploy import helper\n",
        },
    )
    assert [c.path for c in check(tmp_path)] == [("deploy", "deploy.run", "deploy")]


def test_js_cycle_is_reported_and_vendored_files_are_not_read(tmp_path: Path) -> None:
    js = JS_ROOTS[0]
    write(
        tmp_path,
        {
            f"{js}/app.js": 'import { page } from "./page.js";\nimport "./vendor/lib.js";\n',
            f"{js}/page.js": 'import {\n  can,\n} from "./app.js";\n',
            f"{js}/dom.js": 'export { h } from "./page.js";\n',
            f"{js}/vendor/lib.js": 'import "../dom.js";\nimport "./lib.js";\n',
        },
    )
    [cycle] = check(tmp_path)
    assert cycle.language == "js"
    assert cycle.path == (f"{js}/app.js", f"{js}/page.js", f"{js}/app.js")


def test_checker_exits_non_zero_and_prints_the_cycle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, {"bench/a.py": "import bench.a\n"})
    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().out == "python import cycle: bench.a -> bench.a\n"


def test_repository_has_no_import_cycle(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(REPO)]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.startswith("no import cycle among ")
