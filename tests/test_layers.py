"""The layer rules: data flows one way (dataset → preprocessing → segmentor → metric → record →
tables), so the report never imports the pipeline, the pipeline never imports the harness, and
the package's imports form no cycle."""
import ast
import subprocess
import sys
from pathlib import Path

from .conftest import REPO, compose

PACKAGE = REPO / "pearl"
MODEL_SIDE = ("torch", "open_clip", "cv2", "pearl.segmentor", "pearl.loading", "pearl.towers", "pearl.runner")
HARNESS = ("pearl.plan", "pearl.evaluate", "pearl.distributed", "pearl.runner", "pearl.sweep", "pearl.cli",
           "pearl.config", "pearl.tables", "pearl.figures",
           "pearl.records", "hydra", "omegaconf")


def _imported_after(code: str) -> list[str]:
    """The modules of interest that a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_report_layer_reads_records_and_writes_tables_without_the_model_side(synthetic, tmp_path):
    from pearl import runner
    runner.run(compose(["model=tiny", f"data_root={synthetic}", f"results_dir={tmp_path}", "progress=false"]))
    loaded = _imported_after(f"import pearl.tables\npearl.tables.main(['--results', r'{tmp_path}', '--model', 'tiny'])")
    assert not [name for name in MODEL_SIDE if name in loaded]
    assert (tmp_path / "tiny_seed0" / "main.csv").is_file()  # the tables were written
    help_run = subprocess.run([sys.executable, "-X", "importtime", "-m", "pearl.tables", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0 and " torch" not in help_run.stderr and "open_clip" not in help_run.stderr


def test_the_pipeline_never_imports_the_harness():
    loaded = _imported_after("import pearl\nimport pearl.segmentor, pearl.loading, pearl.towers, pearl.methods\n"
                             "import pearl.data\npearl.methods.available_methods()\npearl.Segmentor")
    assert "pearl.segmentor" in loaded and not [name for name in HARNESS if name in loaded]


def _package_imports(path: Path) -> set[str]:
    """The pearl modules ``path`` imports at module level (imports inside functions are deferred)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            if base.startswith("pearl"):
                found |= {f"{base}.{alias.name}" if (PACKAGE.parent / f"{base}.{alias.name}".replace(".", "/")
                                                     ).with_suffix(".py").is_file() else base
                          for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pearl")}
    return found


def test_the_package_imports_form_no_cycle():
    graph = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): _package_imports(path)
             for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}
    assert graph["pearl.tables"] >= {"pearl.records", "pearl.settings"}  # the parser sees real edges
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target == module or target not in graph:
                continue
            assert state.get(target) != "open", " → ".join(trail + [module, target])
            if target not in state:
                visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_every_registered_method_has_its_facts_and_every_protocol_file_a_method():
    from pearl.methods import available_methods, get_method
    from pearl.protocols import method_facts, protocol_methods
    assert available_methods() == protocol_methods()
    for name in available_methods():
        facts = method_facts(name)
        assert all(getattr(get_method(name), field) == value for field, value in facts._asdict().items())
