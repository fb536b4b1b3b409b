"""Sweeps: one spec, a grid of generation settings, one normal run per grid point, and a summary across points.

* :mod:`jobs.sweep.spec`: the spec file and its grid points;
* :mod:`jobs.sweep.runner`: runs the points and expands prompt tables for ``seeds_per_prompt``;
* :mod:`jobs.sweep.summary`: the per-point summary table, read back from the committed runs;
* :mod:`jobs.sweep.command`: the ``karlo sweep`` command.

docs/sweeps.md describes the spec and the output layout.
"""
