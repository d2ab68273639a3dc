"""Attribution methods, one module per family; importing this package registers them all."""

from dpa_lens.methods import atp, attention, depass, dla, dpa, gradients, integrated_gradients, patching, unpack  # noqa: F401  (registration)
