"""Independent transcriptions of the documented computations (docs/), which the tests compare
the package against. Written from the formulas with loops and explicit tensors; never imported by
the package."""
