"""Semantic tiny towers trained by the project itself (``icf towers``).

No pretrained CLIP/CLAP weights can be downloaded here, and random towers carry no semantics. This
package trains the tiny registered configs of :mod:`icf.encoders` (``icf-tiny-clip``,
``icf-tiny-htsat``) contrastively on a labelled dataset's **train** split, with open_clip's and
laion-clap's own model code, and writes checkpoints in the native release layouts plus an
``EncoderSpec`` JSON that ``icf stage extract --encoders THAT.json`` loads with no special case.

* :mod:`icf.towers.examples`: labelled object crops (from the GT masks) and labelled audio seconds;
* :mod:`icf.towers.loss`: the multi-positive symmetric InfoNCE (CLIP's loss when every row has one
  positive);
* :mod:`icf.towers.train`: the training loop, zero-shot evaluation on **val**, the cached run folder;
* :mod:`icf.towers.cli`: ``icf towers``.
"""
