"""Attribution methods, one module per family; importing this package registers them all.

Node methods return an `Attribution` (scores of tokens, heads, neurons), edge methods a `Circuit`
(scores of the edges of `dpa_lens.graph`): `registry.run` calls any of them the same way.
"""

from dpa_lens.methods import (  # noqa: F401  (registration)
    atp,
    attention,
    depass,
    dla,
    dpa,
    eap_ig,
    edge_atp,
    edge_patching,
    gradients,
    integrated_gradients,
    patching,
    unpack,
)
