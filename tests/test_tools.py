"""The repository's tools stay true to the code they act on."""
import sys

from .conftest import REPO


def test_every_mutation_slip_names_code_that_is_there_once():
    """tools/mutation.py applies each slip by replacing its text: text that moved or changed would
    make the slip a no-op that "survives" for the wrong reason."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import mutation
    finally:
        sys.path.remove(str(REPO / "tools"))
    for slip in mutation.SLIPS:
        count = (REPO / slip.path).read_text().count(slip.old)
        assert count == 1, f"slip {slip.name}: its text occurs {count} times in {slip.path}"
        assert (REPO / slip.first.split()[0]).is_file(), slip.first
