"""A process loads only its own stage's code.

Statically: no module of `services/A/` imports another service's package, and `libs` imports
`services` only in `libs/common/stages.py`, the one place that maps a stage to its code.
Dynamically, in a fresh interpreter per case: doing what `surveyor service STAGE` and `surveyor
handler` do before they build anything (load a shipped pipeline, every stage's parameters
validated, and import the stage's class) leaves no other stage's code in `sys.modules`, only the
light `services.<other>.params` models; and no numba kernels or RAAR solver where the stage does
not run them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.common import stages
from libs.common.pipeline import PIPELINES_DIR

ROOT = Path(__file__).resolve().parents[2]
STAGES = Path("libs/common/stages.py")
NUMBA_STAGES = {"peak_worker", "hit_server", "reconstruction_worker"}
"""Services whose own code runs numba kernels (peakfinder8, the detector corrections, RAAR's)."""
SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/service.py") if p.parent.name != "handler")


def _module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every module `path` (relative to `root`) imports, relative imports
    resolved, and the string given to `importlib.import_module` / `__import__` where it is a
    literal or an f-string (`services.*` for `f"services.{name}"`)."""
    tree = ast.parse((root / path).read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in sorted((n for n in ast.walk(tree) if hasattr(n, "lineno")), key=lambda n: (n.lineno, n.col_offset)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            first = node.args[0]
            if name in ("import_module", "__import__"):
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    yield node.lineno, first.value
                elif isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
                    yield node.lineno, f"{first.values[0].value}*"


def _violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(p.relative_to(root) for top in ("services", "libs") for p in (root / top).rglob("*.py")):
        lines = (root / path).read_text().splitlines()
        own = path.parts[1] if path.parts[0] == "services" and len(path.parts) > 2 else None
        for line, name in _imports(path, root):
            parts = name.split(".")
            if parts[0] != "services" or len(parts) < 2:
                continue
            if path.parts[0] == "services" and parts[1] != own:
                found.append(f"{path}:{line}: `{lines[line - 1].strip()}` imports {name}, another service's "
                             f"package (what stages share lives in libs/)")
            elif path.parts[0] == "libs" and path != STAGES:
                found.append(f"{path}:{line}: `{lines[line - 1].strip()}` imports {name}: libs reach a "
                             f"service only through {STAGES}")
    return found


def test_no_service_imports_another_and_libs_import_services_only_through_stages():
    found = _violations()
    assert not found, "\n".join(["imports that load one stage's code in another's process:", *found])


def test_the_walker_sees_every_form_of_import(tmp_path):
    probe = tmp_path / "services" / "writer" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import services.peak_worker.service\nfrom services import dark_worker\n"
                     "from ..hit_server import params\nimport importlib\n"
                     "importlib.import_module(f'services.{x}.service')\nfrom . import disk\n"
                     "from services.writer.cxi import Geometry\n")
    (tmp_path / "libs" / "common").mkdir(parents=True)
    (tmp_path / "libs" / "common" / "flow.py").write_text("from services.writer import disk\n")
    (tmp_path / STAGES).write_text("import importlib\nimportlib.import_module(f'services.{name}.service')\n")
    names = [name for _, name in _imports(probe.relative_to(tmp_path), tmp_path)]
    assert names == ["services.peak_worker.service", "services.dark_worker", "services.hit_server.params",
                     "importlib", "services.*", "services.writer.disk", "services.writer.cxi.Geometry"]
    found = _violations(tmp_path)
    assert [v.split(":")[:2] for v in found] == [["libs/common/flow.py", "1"], ["services/writer/probe.py", "1"],
                                                 ["services/writer/probe.py", "2"], ["services/writer/probe.py", "3"],
                                                 ["services/writer/probe.py", "5"]], found
    assert "`from services.writer import disk` imports services.writer.disk" in found[0]


PROBE = """
import json, sys
import libs.cli.main
from libs.common import stages
from libs.common.pipeline import load
pipeline = load(sys.argv[1])
if sys.argv[2] == "handler":
    stages.handler_class()
else:
    stages.service_class(pipeline.stages[sys.argv[2]].service)
json.dump(sorted(sys.modules), sys.stdout)
"""


def _cases() -> Iterator[tuple[str, str, str]]:
    for name in ("crystallography", "ptychography"):
        tree = tomllib.loads((PIPELINES_DIR / f"{name}.toml").read_text())
        seen = set()
        for stage, config in tree["stages"].items():
            if config["service"] not in seen:
                seen.add(config["service"])
                yield name, stage, config["service"]
        yield name, "handler", "handler"


@pytest.mark.parametrize(("pipeline", "stage", "service"), list(_cases()),
                         ids=[f"{p}-{s}" for p, s, _ in _cases()])
def test_a_process_loads_only_its_own_stage(pipeline, stage, service):
    run = subprocess.run([sys.executable, "-c", PROBE, str(PIPELINES_DIR / f"{pipeline}.toml"), stage],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    modules = json.loads(run.stdout)
    foreign = [m for m in modules if m.startswith("services.") and m.split(".")[1] != service
               and len(m.split(".")) > 2 and m.split(".")[2] != "params"]
    assert not foreign, f"the {stage} process ({service}) loaded other stages' code: {foreign}"
    if service not in NUMBA_STAGES:
        assert "numba" not in modules, f"the {stage} process ({service}) loaded numba, which it never runs"
    if service != "reconstruction_worker":
        assert "services.reconstruction_worker.raar" not in modules, f"the {stage} process loaded the RAAR solver"


@pytest.mark.parametrize("service", SERVICES)
def test_the_light_model_is_the_one_the_service_takes(service):
    assert stages.params_model(service) is stages.service_class(service).Params


@pytest.mark.parametrize("name", ["nonesuch", "handler", "", "writer.disk", "../writer"])
def test_what_is_not_a_stage_service_is_a_lookup_error(name):
    with pytest.raises(LookupError):
        stages.params_model(name)
    with pytest.raises(LookupError):
        stages.service_class(name)
