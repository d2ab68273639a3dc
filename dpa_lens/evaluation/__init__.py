"""Is an attribution faithful, and does it agree with exact patching?

* `faithfulness_curves`: disruption and recovery curves, their AUCs (`Curves.auc`);
* `circuit_faithfulness`: MIB's circuit faithfulness of a `Circuit`'s edge ranking (`CircuitCurve.cpr`, ``.cmd``);
* `agreement`: Pearson, Spearman and top-k overlap against a reference (exact patching);
* `to_transformer_lens`, `circuit_edges`: hand an attribution to TransformerLens's circuit tooling.
"""

from dpa_lens.evaluation.agreement import agreement, correlation
from dpa_lens.evaluation.circuit_faithfulness import MIB_FRACTIONS, CircuitCurve, circuit_faithfulness, circuit_values
from dpa_lens.evaluation.faithfulness import COMPONENT_FRACTIONS, TOKEN_FRACTIONS, Curves, faithfulness_curves
from dpa_lens.evaluation.interop import circuit_edges, to_transformer_lens

__all__ = [
    "COMPONENT_FRACTIONS", "MIB_FRACTIONS", "TOKEN_FRACTIONS", "CircuitCurve", "Curves", "agreement", "circuit_edges", "circuit_faithfulness",
    "circuit_values", "correlation", "faithfulness_curves", "to_transformer_lens",
]
