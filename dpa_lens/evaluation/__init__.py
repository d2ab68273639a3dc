"""Is an attribution faithful, and does it agree with exact patching?

* `faithfulness_curves`: disruption and recovery curves, their AUCs (`Curves.auc`);
* `agreement`: Pearson, Spearman and top-k overlap against a reference (exact patching);
* `to_transformer_lens`, `circuit_edges`: hand an attribution to TransformerLens's circuit tooling.
"""

from dpa_lens.evaluation.agreement import agreement, correlation
from dpa_lens.evaluation.faithfulness import COMPONENT_FRACTIONS, TOKEN_FRACTIONS, Curves, faithfulness_curves
from dpa_lens.evaluation.interop import circuit_edges, to_transformer_lens

__all__ = [
    "COMPONENT_FRACTIONS", "TOKEN_FRACTIONS", "Curves", "agreement", "circuit_edges", "correlation", "faithfulness_curves", "to_transformer_lens",
]
