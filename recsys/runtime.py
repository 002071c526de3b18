"""ONNX Runtime's CPU session settings: one place for the shopper encoder and the ranker's trees."""

from __future__ import annotations

import onnxruntime as ort


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Sequential CPU execution on ``intra_op_threads`` threads (1 for serving's single requests, the
    core count for a batch job's throughput), quiet below errors."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # spinning intra-op workers would burn the cores that FAISS, the server or the job's other threads need
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options
