"""Arrow schemas of the files a cell writes (see docs/internals.md)."""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

EVENTS_SCHEMA = pa.schema([
    ("cell_id", pa.string()),
    ("repeat", pa.int32()),
    ("phase", pa.string()),
    ("batch_index", pa.int32()),
    ("start_ns", pa.int64()),
    ("end_ns", pa.int64()),
    ("n_seqs", pa.int32()),
    ("tokens_in", pa.int64()),
    ("tokens_out", pa.int64()),
])

RESPONSES_SCHEMA = pa.schema([
    ("cell_id", pa.string()),
    ("repeat", pa.int32()),
    ("batch_index", pa.int32()),
    ("prompt_id", pa.string()),
    ("tokens_in", pa.int64()),
    ("tokens_out", pa.int64()),
    ("words_out", pa.int64()),
    ("text", pa.string()),
    ("reference", pa.string()),
    ("correct", pa.bool_()),
    ("template", pa.string()),
])

PHASES = ("idle", "load", "warmup", "prefill", "decode")
