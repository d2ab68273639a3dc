"""Unpack (arXiv 2605.23393, "Every Component is a Lookup"): credit split back through every
component's reads, to tokens and named paths, over a TransformerLens cache.

* `unpack`: token credit, head flow and the strongest paths for a target (or a rerooted unit);
* `unpack_validate`: Unpack's six closure checks on a cache;
* `PRESETS`: the reference's six configurations (`Preset`).

Modules: `rules` (presets, branch weights, the safe denominator, the marginal norm),
`decomposition` (one row's components and the split tables of each layer), `sweep` (the unpruned
flow sweep and the pruned path recursion, together from the top layer down), `method` (the public
functions and the closure checks).
"""

from dpa_lens.methods.unpack.method import CLOSURE_TOLERANCES, UnpackClosure, unpack, unpack_hook_names, unpack_validate
from dpa_lens.methods.unpack.rules import PRESETS, Preset

__all__ = ["CLOSURE_TOLERANCES", "PRESETS", "Preset", "UnpackClosure", "unpack", "unpack_hook_names", "unpack_validate"]
