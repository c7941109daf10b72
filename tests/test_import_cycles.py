"""No import cycles among retro_kernels/, models/ and bench/: tools/import_cycles.py reads the import statements."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "import_cycles.py"


def _tool():
    spec = importlib.util.spec_from_file_location("import_cycles", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_project_has_no_import_cycles():
    tool = _tool()
    graph = tool.import_graph(ROOT, tool.PACKAGES)
    assert "models.train" in graph and "bench.cli" in graph and "retro_kernels.dispatch" in graph
    assert "models.runtime" in graph["models.train"]  # the edges are read: not an empty graph
    assert tool.cycles(graph) == [], "\n".join(" -> ".join(loop) for loop in tool.cycles(graph))


def _write(root: Path, files: dict) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_it_finds_a_loop_closed_by_a_lazy_or_relative_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",                           # a -> b
        "pkg/sub/__init__.py": "from .c import thing\n",         # pkg.sub -> pkg.sub.c
        "pkg/sub/c.py": "import os\n\ndef f():\n    from ..a import g\n",  # c -> a, lazily
        "pkg/b.py": "from pkg.sub import thing\n",               # b -> pkg.sub (its __init__)
        "pkg/free.py": "from pkg import a\nimport pkg.b\n",      # imports into the loop, not part of it
    })
    tool = _tool()
    graph = tool.import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.sub"}
    assert tool.cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.a"]]
    (tmp_path / "pkg/sub/c.py").write_text("import os\n")
    assert tool.cycles(tool.import_graph(tmp_path, ["pkg"])) == []


def test_the_command_exits_0_here_and_names_a_bad_package():
    done = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no import cycles" in done.stdout, done.stdout + done.stderr
    bad = subprocess.run([sys.executable, str(TOOL), "no_such_package"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "no_such_package" in bad.stderr
