"""dpa_lens: Dual Path Attribution and its baselines for TransformerLens models.

    model = dpa_lens.load_model("smollm2-135m")
    logits, cache = model.run_with_cache(tokens)
    attr = dpa_lens.dpa(model, cache, (" Mary", " John"))
    attr.top(10, "heads")

Node methods return an `Attribution`, edge methods (``dpa_edges``, ``edge_atp``, ``eap_ig``, ``edge_patching``,
``edge_random``) a `Circuit`; ``run(name, model, prompt, target, ...)`` runs any of them the same way
(`available_methods` lists them, `get_method` tells what each takes and returns).
"""

import warnings
from importlib.metadata import PackageNotFoundError, version

with warnings.catch_warnings():
    # TransformerLens imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns "IProgress not found" and
    # falls back to text bars: what dpa_lens's bars do there anyway (dpa_lens.progress), so the warning says nothing
    warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401

from dpa_lens import datasets, evaluation, plot
from dpa_lens.errors import (
    CacheError,
    DpaLensError,
    InputError,
    ModelNotAvailableError,
    PairError,
    TargetError,
    TrainModeError,
    UnsupportedModelError,
)
from dpa_lens.evaluation.circuit_faithfulness import circuit_faithfulness
from dpa_lens.methods.atp import atp
from dpa_lens.methods.attention import attention_last, attention_mean, attention_rollout, random_baseline
from dpa_lens.methods.depass import depass
from dpa_lens.methods.dla import dla
from dpa_lens.methods.dpa import Mu, dpa, dpa_edges, dpa_edges_ig, dpa_hook_names, dpa_names_filter, dpa_paths
from dpa_lens.methods.eap_ig import eap_ig
from dpa_lens.methods.edge_atp import edge_atp, edge_random
from dpa_lens.methods.edge_patching import edge_patching
from dpa_lens.methods.gradients import gradient, input_x_gradient
from dpa_lens.methods.integrated_gradients import integrated_gradients
from dpa_lens.methods.patching import activation_patching
from dpa_lens.methods.registry import MethodSpec, attribute, available_methods, cache_for, get_method, method_table, names_filter, run
from dpa_lens.methods.unpack import unpack, unpack_validate
from dpa_lens.models.fast_attention import fused_attention
from dpa_lens.models.load import load_model
from dpa_lens.models.tl import model_lock
from dpa_lens.models.view import SUPPORTED_ARCHITECTURES
from dpa_lens.results import KINDS, Attribution, Circuit, Diagnostics, Hop, Path
from dpa_lens.runs import DatasetResults, attribute_dataset, load_results
from dpa_lens.types import TLModel

try:
    __version__ = version("dpa-lens")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "KINDS",
    "Attribution",
    "CacheError",
    "Circuit",
    "DatasetResults",
    "Diagnostics",
    "Hop",
    "DpaLensError",
    "InputError",
    "MethodSpec",
    "ModelNotAvailableError",
    "Mu",
    "PairError",
    "Path",
    "SUPPORTED_ARCHITECTURES",
    "TLModel",
    "TargetError",
    "TrainModeError",
    "UnsupportedModelError",
    "activation_patching",
    "atp",
    "attribute_dataset",
    "attention_last",
    "attention_mean",
    "attention_rollout",
    "attribute",
    "available_methods",
    "cache_for",
    "circuit_faithfulness",
    "datasets",
    "depass",
    "dla",
    "dpa",
    "dpa_edges",
    "dpa_edges_ig",
    "dpa_hook_names",
    "dpa_names_filter",
    "dpa_paths",
    "eap_ig",
    "edge_atp",
    "edge_patching",
    "edge_random",
    "fused_attention",
    "evaluation",
    "get_method",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "load_model",
    "load_results",
    "model_lock",
    "method_table",
    "names_filter",
    "plot",
    "random_baseline",
    "run",
    "unpack",
    "unpack_validate",
]
