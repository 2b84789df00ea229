"""Prompt data: the record schema, the paper's Hugging Face sets, and the tiny offline profile.

``peagle.data.hf`` imports ``datasets`` only when a loader runs, so importing this package is cheap.
"""

from peagle.data.hf import HF_DATASETS, HFDataError, load_hf_prompts, make_hf_data, rows_to_records
from peagle.data.io import DATA_FILES, MANIFEST_NAME, DataDirError, validate_data_dir, write_data_dir
from peagle.data.schema import (
    EVAL_ROLES,
    ROLES,
    PromptRecord,
    SchemaError,
    read_prompts,
    write_prompts,
)
from peagle.data.tiny import TinyDataError, make_math_problem, make_tiny_data

__all__ = [
    "DATA_FILES",
    "EVAL_ROLES",
    "HF_DATASETS",
    "MANIFEST_NAME",
    "ROLES",
    "DataDirError",
    "HFDataError",
    "PromptRecord",
    "SchemaError",
    "TinyDataError",
    "load_hf_prompts",
    "make_hf_data",
    "make_math_problem",
    "make_tiny_data",
    "read_prompts",
    "rows_to_records",
    "validate_data_dir",
    "write_data_dir",
    "write_prompts",
]
