"""Prompt sets for attribution experiments: IOI (generated), and the authors' Known 1000 and IOI."""

from dpa_lens.datasets.benchmarks import Fact, IOIItem, answered_correctly, ioi_benchmark, known_1000
from dpa_lens.datasets.ioi import IOIPrompt, corrupt, ioi_dataset

__all__ = ["Fact", "IOIItem", "IOIPrompt", "answered_correctly", "corrupt", "ioi_benchmark", "ioi_dataset", "known_1000"]
