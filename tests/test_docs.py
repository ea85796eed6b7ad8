"""Every documentation reference in the code, the README, the configs and the docs points into docs/."""
import re

from .conftest import REPO

# "docs/x.md", "docs/x.md §2.1" or a bare "x.md §2.1" (a bare "x.md" may be a results table's name).
REFERENCE = re.compile(r"(?<![\w/])(?:docs/([a-z_]+\.md)(?:\s*§\s*(\d+(?:\.\d+)*))?"
                       r"|([a-z_]+\.md)\s*§\s*(\d+(?:\.\d+)*))")
SOURCES = ["pearl/**/*.py", "pearl/resources/protocols/*.yaml", "conf/**/*.yaml", "experiments/*", "benchmarks/*",
           "tests/*.py", "run.py", "README.md", "docs/*.md", "pyproject.toml", ".ci/run"]


def _references():
    for pattern in SOURCES:
        for path in REPO.glob(pattern):
            if path.is_file() and path.name != "test_docs.py":
                for match in REFERENCE.finditer(path.read_text(encoding="utf-8")):
                    name, section = (match.group(1), match.group(2)) if match.group(1) else match.group(3, 4)
                    yield path.relative_to(REPO), name, section


def test_every_cited_document_and_section_exists_in_the_repository():
    missing = []
    for source, name, section in _references():
        if name == "README.md":
            continue
        target = REPO / "docs" / name
        if not target.is_file():
            missing.append(f"{source}: {name}")
        elif section and not re.search(rf"^#+ {re.escape(section)}[. ]", target.read_text(encoding="utf-8"), re.M):
            missing.append(f"{source}: {name} §{section}")
    assert not missing, "references to documents or sections that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_nothing_cites_the_specification_outside_the_repository():
    offenders = [str(path) for pattern in SOURCES for path in REPO.glob(pattern)
                 if path.is_file() and path.name != "test_docs.py"
                 and "spec/" in path.read_text(encoding="utf-8", errors="replace")]
    assert not offenders, offenders


def test_the_check_would_catch_a_dangling_reference():
    assert REFERENCE.search("see docs/nowhere.md §2").group(1, 2) == ("nowhere.md", "2")
    assert REFERENCE.search("as in protocol.md §6.5 says").group(3, 4) == ("protocol.md", "6.5")
    assert not (REPO / "docs" / "nowhere.md").exists()


def test_the_dataset_tables_in_the_docs_agree_with_the_benchmarks_table():
    from pearl.benchmarks import BENCHMARKS
    from pearl.protocols import class_names
    rows = {}
    for line in (REPO / "docs" / "datasets.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and re.fullmatch(r"`\w+`", cells[0]) and cells[3].isdigit():
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(BENCHMARKS)
    for name, cells in rows.items():
        benchmark = BENCHMARKS[name]
        assert int(cells[3]) == benchmark.official_size, name
        assert cells[4].split()[0] == str(len(class_names(name))), name
        if not cells[1].startswith("as "):
            assert cells[1].startswith(f"`{benchmark.image_dir}/"), name


def test_every_recipe_sweeps_the_papers_eight_datasets():
    from pearl.benchmarks import DATASETS
    sweeps = [(path.name, match) for path in [*(REPO / "experiments").glob("*.sh"), *(REPO / "conf" / "experiment")
                                               .glob("*.yaml")]
              for match in re.findall(r"\bdataset[=:] ?([\w,]+,[\w,]+)", path.read_text(encoding="utf-8"))]
    assert len(sweeps) >= 11
    for name, value in sweeps:
        datasets = value.split(",")
        if name == "tlp_grid.sh":  # Fig. 4 plots four of them
            assert set(datasets) < set(DATASETS), name
        else:
            assert datasets == list(DATASETS), name  # no extra evaluation set in a paper table's sweep
