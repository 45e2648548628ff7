"""Batch augmentations shared by training and evaluation (above the stages, below `icf.train` and
`icf.eval`): ``negatives.py`` (negative audio: silence, pink noise, off-screen donors)."""
