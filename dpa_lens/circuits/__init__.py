"""Circuits: how attributed units connect (edges writer → reader through q, k, v, mlp or logit), and paths."""

from dpa_lens.circuits.result import LABELS, Circuit, Hop, Path, graph

__all__ = ["LABELS", "Circuit", "Hop", "Path", "graph"]
