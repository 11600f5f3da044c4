"""Ratio benchmarks of pyro_ext against the anchor each part is meant to replace or match.

Run one with ``python -m benchmarks NAME`` (``--list`` shows the names, ``--quick`` uses small
sizes, ``--json PATH`` writes the figures). Each benchmark module defines
``run(quick: bool = False) -> list[Measurement]``; timings of ours and of the anchor are taken in the
same process, interleaved and repeated, and compared by their medians. These run on demand, not in CI.
"""
