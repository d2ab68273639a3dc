"""The benchmarks, run from the repository root as modules, each writing its results under bench/results:

    python -m bench.speed          # seconds and peak memory against the model's own forward and backward
    python -m bench.faithfulness   # faithfulness curves and agreement with exact patching
    python -m bench.circuits       # circuit faithfulness (MIB's CPR/CMD), edge agreement, edge cost
    python -m bench.readme         # the README's generated blocks from the committed results (--check)

`bench.common` holds what they share.
"""
