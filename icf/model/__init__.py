"""ICF model: baseline segmenter (backbone, pixel decoder, query decoder), MIT, SC, CDCL and losses.

Public entry point: ``ICF(segmenter, encoders, text_bank)`` over a `icf.model.segmenter.Segmenter`; see `icf.model.icf`.
"""

from icf.model.icf import ICF

__all__ = ["ICF"]
