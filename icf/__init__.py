"""icf — staged offline AVS pipeline and trainer implementing ICF (Zha et al. 2025)."""

import os

# icf never reaches a model hub: every checkpoint comes from a local path. laion-clap builds a
# BERT tokenizer at import time, which would otherwise retry the hub for about a minute on an offline machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
