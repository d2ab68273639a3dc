"""Datasets at scale: any method over thousands of records, in batches, resumable, in several processes.

    res = dpa_lens.attribute_dataset(model, "dpa", "ioi.jsonl", out="runs/ioi", batch_size=8)
    res = dpa_lens.load_results("runs/ioi")      # later, or in another process
    res.mean().show()                             # the dataset's attribution (or circuit), streamed

`records` reads and checks the records; `runner` batches them by length and runs the method;
`store` keeps each batch as a Parquet shard beside a manifest and reads them back; `distributed`
says which process this is under ``torchrun``.
"""

from dpa_lens.runs.records import Record, read_records
from dpa_lens.runs.runner import attribute_dataset
from dpa_lens.runs.store import DatasetResults, load_results

__all__ = ["DatasetResults", "Record", "attribute_dataset", "load_results", "read_records"]
