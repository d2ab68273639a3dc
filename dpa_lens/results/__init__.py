"""What methods return: `Attribution` (scores of tokens, heads and neurons), `Circuit` (scores of edges),
`Path` and `Hop` (named chains to the logit), on the shared row behaviour of `dpa_lens.results.rows`;
`RunningMean`, their mean over rows given part by part. `dpa_lens.results.table` stores them as Arrow tables."""

from dpa_lens.results.attribution import KINDS, Attribution, Kind
from dpa_lens.results.circuit import Circuit
from dpa_lens.results.paths import Hop, Path
from dpa_lens.results.rows import Diagnostics, RunningMean

__all__ = ["KINDS", "Attribution", "Circuit", "Diagnostics", "Hop", "Kind", "Path", "RunningMean"]
