"""dpa_lens: Dual Path Attribution and its baselines for TransformerLens models.

    model = dpa_lens.load_model("smollm2-135m")
    logits, cache = model.run_with_cache(tokens)
    attr = dpa_lens.dpa(model, cache, (" Mary", " John"))
    attr.top(10, "heads")

Every method returns an `Attribution`; `attribute(name, ...)` runs one by name.
"""

from dpa_lens import datasets, evaluation, plot
from dpa_lens.attribution import Attribution
from dpa_lens.inputs import CacheError
from dpa_lens.methods._grad import TrainModeError
from dpa_lens.methods.atp import PairError, atp
from dpa_lens.methods.attention import attention_last, attention_mean, attention_rollout, random_baseline
from dpa_lens.methods.dla import dla
from dpa_lens.methods.dpa import Mu, dpa, dpa_hook_names, dpa_names_filter
from dpa_lens.methods.gradients import gradient, input_x_gradient, integrated_gradients
from dpa_lens.methods.patching import activation_patching
from dpa_lens.methods.registry import attribute, available_methods, get_method, names_filter
from dpa_lens.models.load import ModelNotAvailableError, load_model
from dpa_lens.models.view import SUPPORTED_ARCHITECTURES, UnsupportedModelError
from dpa_lens.targets import TargetError

__version__ = "0.1.0.dev0"

__all__ = [
    "Attribution",
    "CacheError",
    "ModelNotAvailableError",
    "Mu",
    "PairError",
    "SUPPORTED_ARCHITECTURES",
    "TargetError",
    "TrainModeError",
    "UnsupportedModelError",
    "activation_patching",
    "atp",
    "attention_last",
    "attention_mean",
    "attention_rollout",
    "attribute",
    "available_methods",
    "datasets",
    "dla",
    "evaluation",
    "dpa",
    "dpa_hook_names",
    "dpa_names_filter",
    "get_method",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "load_model",
    "names_filter",
    "plot",
    "random_baseline",
]
