"""Circuits: how attributed units connect (edges writer → reader through q, k, v, mlp or logit), and paths.

The result types live here; the methods that make them are imported from their modules
(`dpa_lens.circuits.dpa_edges`, `dpa_lens.circuits.dpa_paths`), since `dpa_lens.attribution` imports this
package and the methods import `dpa_lens.attribution`.
"""

from dpa_lens.circuits.paths import LABELS, Hop, Path
from dpa_lens.circuits.result import Circuit, graph

__all__ = ["LABELS", "Circuit", "Hop", "Path", "graph"]
