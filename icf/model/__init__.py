"""ICF model: baseline segmenter (backbone, pixel decoder, query decoder), MIT, SC, CDCL and losses.

Public entry point: ``ICF(cfg, encoders, text_bank)``; see `icf.model.icf`.
"""

from icf.model.icf import ICF

__all__ = ["ICF"]
