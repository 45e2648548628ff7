"""Reference predictors that show whether a model uses its audio (synthetic data only).

``visible_objects`` — "segment every visible object": for each frame, every object on screen with its true
class (binary tasks: foreground), whether it sounds or not. It is an oracle of the *visual* part of the
task (perfect detection and classification of all objects) that ignores the audio; on the synthetic data
silent distractors and silent seconds are frequent, so a model must beat it by listening. The maps are
rendered from the synthetic generator's clip plans (:func:`icf.data.synth.plan_clips`, the same schedule
that wrote the ground truth), at the dataset's native size, then resized exactly like the ground truth
(the shard stage's nearest resize, then the loader's).

The second control, the trained model with clip-shuffled audio, is :class:`icf.eval.robustness.AudioRotation`
(``icf eval --shuffle-audio``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from icf.data.datasets import load_info, object_vocabulary
from icf.data.shards import resize_square
from icf.data.synth import ClipPlan, plan_clips, render_frame, select_classes, signatures
from icf.eval.evaluate import Predictor
from icf.stages.shard import fit


def visible_object_map(plan: ClipPlan, t: int, size: int, sigs: dict, binary: bool, class_id: Any) -> np.ndarray:
    """``(size, size)`` uint8: the class id (or 1) of the object seen at every pixel of frame ``t``, 0 elsewhere."""
    _, owner = render_frame(plan, t, size, sigs)
    lut = np.zeros(len(plan.objects) + 1, np.uint8)
    for k, obj in enumerate(plan.objects):
        lut[k + 1] = 1 if binary else class_id(obj.name)
    return lut[owner]


def visible_objects(layout: str, clips: int, seed: int, classes: int, native_size: int, shard_size: int,
                    image_size: int) -> Predictor:
    """The "segment every visible object" predictor for a tree written by ``icf synth`` with these arguments.

    Returns probabilities (0/1) for S4/MS3 and class ids for AVSS, ``(B, T, image_size, image_size)``.
    """
    info = load_info(layout)
    binary = info.binary
    plans = {p.uid: p for p in plan_clips(layout, clips, seed, classes)}
    sigs = signatures(select_classes(object_vocabulary(layout), classes))

    def predict(batch: dict[str, Any]) -> torch.Tensor:
        b, t = batch["valid"].shape
        out = torch.zeros(b, t, image_size, image_size, dtype=torch.int64)
        for i, uid in enumerate(batch["uid"]):
            plan = plans[uid]
            crop = info.crops(plan.split)
            for f in range(plan.n_frames):
                ids = visible_object_map(plan, f, native_size, sigs, binary, info.class_id)
                stored = np.asarray(fit(Image.fromarray(ids, "L"), shard_size, crop, Image.Resampling.NEAREST))
                out[i, f] = resize_square(torch.from_numpy(stored.astype(np.int64))[None, None], image_size, nearest=True)[0, 0]
        return out.float() if binary else out

    return predict
