"""QDFormer (`icf.model.qdformer`, method ``qdformer``): the math of its parts against hand computations and
brute force (spec peers.md §5, QDFormer 1–11), and the method's plumbing (shapes, padding, registry errors)."""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icf import methods
from icf.config import ModelConfig, preset
from icf.methods.qdformer import QDFormerOptions
from icf.model.dynamic_conv import dynamic_masks, param_count, relative_coords, split_params
from icf.model.matching import (Prediction, SetCriterion, clip_objects, cxcywh_to_xyxy, generalized_box_iou, hungarian,
                                masks_to_boxes)
from icf.model.qdformer import QDFormer, set_logits
from icf.model.vq import VectorQuantizer, nearest_code


def tiny_qd(dataset: str = "s4", ablate: frozenset[str] = frozenset(), **opts) -> QDFormer:
    """The tiny preset's QDFormer (method preset applied) with extra options."""
    spec = methods.get("qdformer")
    model_cfg, train_cfg = preset("tiny", dataset)
    model_cfg, _ = spec.preset("tiny", dataclasses.replace(model_cfg, method="qdformer"), train_cfg)
    model_cfg = dataclasses.replace(model_cfg, ablate=ablate, options={**model_cfg.options, **opts})
    return QDFormer(model_cfg, methods.validate(model_cfg))


def make_batch(cfg: ModelConfig, b: int = 2, n_real: list[int] | None = None, seed: int = 0) -> dict:
    """A random Batch with the members QDFormer reads; ``n_real`` pads clips."""
    g = torch.Generator().manual_seed(seed)
    t, h = cfg.frames, cfg.image_size
    valid = torch.ones(b, t, dtype=torch.bool)
    for i, n in enumerate(n_real or []):
        valid[i, n:] = False
    return {"frames": torch.randn(b, t, 3, h, h, generator=g), "masks": torch.randint(0, max(cfg.num_classes, 2), (b, t, h, h), generator=g),
            "gt": valid.clone(), "valid": valid, "mel": torch.randn(b, t, 96, 64, generator=g)}


# ---- 1-5: the shared codebook -----------------------------------------------------------------------------


def _vq() -> VectorQuantizer:
    vq = VectorQuantizer(4, 2, commitment=0.25)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    return vq


G = [[0.9, 0.1], [0.2, 0.8], [0.4, 0.4], [0.5, 0.0]]


def test_assignment_picks_the_nearest_code_and_the_lowest_index_on_ties() -> None:
    vq = _vq()
    q = vq(torch.tensor(G))
    assert q.idx.tolist() == [1, 2, 0, 0]  # the last is a tie between codes 0 and 1
    torch.testing.assert_close(q.st, vq.codebook[[1, 2, 0, 0]].detach())
    torch.testing.assert_close(q.codes, vq.codebook[[1, 2, 0, 0]].detach())


def test_straight_through_gradient_is_the_identity_and_skips_the_codebook() -> None:
    vq = _vq()
    g = torch.tensor(G, requires_grad=True)
    vq(g).st.sum().backward()
    torch.testing.assert_close(g.grad, torch.ones(4, 2))
    assert vq.codebook.grad is None


def test_codebook_term_moves_only_the_codebook_and_commitment_only_the_tokens() -> None:
    vq = _vq()
    g = torch.tensor(G, requires_grad=True)
    q = vq(g)
    e = vq.codebook.detach()[[1, 2, 0, 0]]
    gv = torch.tensor(G)
    assert float(q.codebook_loss.detach()) == pytest.approx(float(((e - gv) ** 2).mean()))
    assert float(q.commit_loss.detach()) == pytest.approx(0.25 * float(((e - gv) ** 2).mean()))
    q.codebook_loss.backward(retain_graph=True)
    assert g.grad is None
    expected = torch.zeros(4, 2)
    for i, k in enumerate([1, 2, 0, 0]):
        expected[k] += 2 * (e[i] - gv[i]) / 8  # 2(e − g)/numel summed onto the selected rows
    torch.testing.assert_close(vq.codebook.grad, expected)
    assert float(vq.codebook.grad[3].abs().sum()) == 0.0  # the unused code
    vq.codebook.grad = None
    q.commit_loss.backward()
    assert vq.codebook.grad is None
    torch.testing.assert_close(g.grad, 2 * 0.25 * (gv - e) / 8)


def test_the_local_path_never_updates_the_codebook() -> None:
    vq = _vq()
    g = torch.tensor(G, requires_grad=True)
    l = torch.tensor(G[::-1], requires_grad=True)
    q = vq(l, update_codebook=False)
    assert float(q.codebook_loss) == 0.0
    (q.commit_loss + q.st.sum()).backward()
    assert vq.codebook.grad is None or float(vq.codebook.grad.abs().sum()) == 0.0
    assert g.grad is None and l.grad is not None
    qg = vq(g)
    (qg.codebook_loss + qg.commit_loss).backward()
    assert float(vq.codebook.grad.abs().sum()) > 0  # the global terms do update C


def test_dead_codes_are_reseeded_from_the_buffer_after_their_idle_batches_and_only_in_training() -> None:
    vq = _vq()
    vq.restart_after = 2
    g = torch.tensor(G)  # selects codes 1, 2, 0, 0: code 3 is never used
    for step in range(2):  # two batches in which code 3 goes unused
        q = vq(g)
        assert q.restarted == 0 and vq.idle.tolist() == [0, 0, 0, step + 1]
    assert int(vq.seen) == 8 and torch.equal(vq.buffered(), torch.cat([g, g]))  # the buffer holds both batches
    torch.manual_seed(0)
    q = vq(g)  # code 3 is dead: it is re-seeded onto a buffered token before the lookup
    assert q.restarted == 1
    assert any(torch.equal(vq.codebook[3].detach(), t) for t in g)
    assert torch.equal(vq.codebook[:3].detach(), _vq().codebook[:3].detach())  # live codes are untouched
    hit = int(q.idx[[torch.equal(vq.codebook[3].detach(), t) for t in g].index(True)])
    assert hit == 3  # the token it sits on now selects it
    vq.idle.fill_(5)
    before = vq.codebook.detach().clone()
    local = vq(g, update_codebook=False)  # local lookups neither restart, nor count as use, nor fill the buffer
    assert local.restarted == 0 and vq.idle.tolist() == [5] * 4 and int(vq.seen) == 12
    vq.eval()
    assert vq(g).restarted == 0 and vq.idle.tolist() == [5] * 4 and int(vq.seen) == 12  # nor does evaluation
    assert torch.equal(vq.codebook.detach(), before)


def test_restart_never_puts_two_codes_on_one_token_nor_one_on_a_live_code() -> None:
    """Many dead codes, few tokens: each re-seeded code gets its own token, a token a live code sits on gets none,
    and the codes left over stay dead until new tokens come (never all onto one token, as before)."""
    vq = VectorQuantizer(6, 2, restart_after=1)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [9.0, 9.0], [8.0, 9.0], [9.0, 8.0], [7.0, 9.0], [9.0, 7.0]]))
    tokens = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # two sit exactly on code 0
    vq(tokens)  # codes 1-5 unused: dead for the next batch
    assert vq.idle.tolist() == [0, 1, 1, 1, 1, 1]
    for seed in range(20):
        trial = VectorQuantizer(6, 2, restart_after=1)
        trial.load_state_dict(vq.state_dict())
        torch.manual_seed(seed)
        q = trial(tokens)
        assert q.restarted == 2  # [1, 0] and [0, 2]: the only buffered tokens off every code
        changed = [c for c, o in zip(trial.codebook.tolist()[1:], vq.codebook.tolist()[1:]) if c != o]
        assert sorted(changed) == [[0.0, 2.0], [1.0, 0.0]]  # one code per token, each token once
        assert trial.idle.tolist().count(0) >= 3 and max(trial.idle.tolist()) == 2  # the rest wait, still dead


def test_restart_reseeds_from_earlier_batches_and_prefers_badly_served_tokens() -> None:
    """The buffer spans batches: a batch that brings nothing new still lets dead codes come back, from tokens of
    earlier batches; and k-means++ seeding picks the tokens far from every live code far more often."""
    far, near = torch.tensor([[5.0, 5.0]]), torch.tensor([[0.1, 0.0]])
    vq = VectorQuantizer(2, 2, restart_after=1, buffer_size=8)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [-9.0, -9.0]]))
    vq(torch.cat([far, near]))  # both tokens select code 0: code 1 is dead from the next batch
    assert vq.idle.tolist() == [0, 1]
    torch.manual_seed(0)
    q = vq(torch.zeros(1, 2))  # this batch sits on code 0 itself: only the earlier batch can re-seed code 1
    assert q.restarted == 1 and torch.equal(vq.codebook[1].detach(), far[0])  # P(far) = 50/50.01
    counts = {"far": 0, "near": 0}
    for seed in range(200):
        vq = VectorQuantizer(2, 2, restart_after=1, buffer_size=16)
        with torch.no_grad():
            vq.codebook.copy_(torch.tensor([[0.0, 0.0], [-9.0, -9.0]]))
        vq(torch.cat([far.expand(1, 2), near.expand(9, 2)]))  # nine near tokens, one far one
        torch.manual_seed(seed)
        vq(torch.zeros(1, 2))
        counts["far" if torch.equal(vq.codebook[1].detach(), far[0]) else "near"] += 1
    assert counts["far"] > 180, counts  # P(far) = 50 / (50 + 9·0.01) ≈ 0.998; uniform drawing would give 0.1


def test_a_masked_token_neither_seeds_a_code_nor_keeps_one_alive() -> None:
    vq = _vq()
    vq.restart_after = 1
    g = torch.tensor([[1.0, 1.0], [0.9, 0.1], [5.0, 5.0]])  # selects codes 3, 1, 3
    mask = torch.tensor([False, True, False])
    vq(g, mask=mask)
    assert vq.idle.tolist() == [1, 0, 1, 1]  # only the real token's code counts
    assert torch.equal(vq.buffered(), g[1:2])  # and only it is buffered
    q = vq(g, mask=mask)
    assert q.restarted == 1  # one real token off the live code: one code re-seeded onto it, the other two wait
    torch.testing.assert_close(vq.codebook.detach()[0], g[1])
    torch.testing.assert_close(vq.codebook.detach()[1], torch.tensor([1.0, 0.0]))  # the live one stays
    assert vq.idle.tolist()[2:] == [2, 2]


def test_the_restart_buffer_is_saved_so_a_resumed_quantiser_reseeds_alike() -> None:
    torch.manual_seed(3)
    a = VectorQuantizer(8, 4, restart_after=1, buffer_size=5)
    batches = [torch.randn(3, 4) for _ in range(4)]
    for x in batches[:2]:
        a(x)
    b = VectorQuantizer(8, 4, restart_after=1, buffer_size=5)
    b.load_state_dict(a.state_dict())
    # ring of 5 rows: batch 0 filled rows 0-2, batch 1 rows 3, 4 and then 0 (its last token over the oldest)
    assert int(b.seen) == 6 and torch.equal(b.buffered(), torch.cat([batches[1][2:], batches[0][1:], batches[1][:2]]))
    for x in batches[2:]:
        results = []
        for q in (a, b):  # the same random draws for both
            torch.manual_seed(11)
            results.append(q(x))
        qa, qb = results
        assert qa.restarted == qb.restarted and torch.equal(qa.idx, qb.idx)
    assert torch.equal(a.codebook, b.codebook)


def test_without_restarts_the_tiny_codebook_collapses_and_with_them_it_stays_in_use() -> None:
    """The property the restarts exist for, on the real model: a few optimiser steps on random batches leave
    plain VQ using fewer codes than with restarts (its tokens sit near one code)."""
    used = {}
    for restart in (0, 2):
        torch.manual_seed(0)
        model = tiny_qd("avss", vq_restart=restart).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        codes = set()
        for step in range(8):
            out = model(make_batch(model.cfg, b=4, seed=step))
            model.loss(out, make_batch(model.cfg, b=4, seed=step))["total"].backward()
            opt.step()
            opt.zero_grad()
            if step >= 4:
                codes |= set(out["codes"].flatten().tolist())
        used[restart] = len(codes)
    assert used[2] > used[0], used


def test_one_codebook_serves_global_and_local_tokens() -> None:
    torch.manual_seed(0)
    model = tiny_qd("avss")
    quantizers = [m for m in model.modules() if isinstance(m, VectorQuantizer)]
    assert len(quantizers) == 1 and quantizers[0].codebook.shape == (16, 48)
    book = model.vq.codebook.detach()
    assert nearest_code(book + 1e-4, book).tolist() == list(range(16))
    assert model.vq(book + 1e-4, update_codebook=False).idx.tolist() == list(range(16))
    batch = make_batch(model.cfg, n_real=[5, 10])
    _, sem = model.eval().outputs(batch)
    torch.testing.assert_close(sem.l_hat, book[sem.l_idx])  # local tokens take codes of the same codebook
    torch.testing.assert_close(sem.g_hat, book[sem.g_idx])


# ---- 6: locality ----------------------------------------------------------------------------------------


def test_local_tokens_follow_their_frame_and_global_tokens_the_clip() -> None:
    torch.manual_seed(1)
    model = tiny_qd("s4").eval()
    batch = make_batch(model.cfg)
    _, base = model.outputs(batch)
    changed = {**batch, "mel": batch["mel"].clone()}
    changed["mel"][0, 2] += 3.0
    _, sem = model.outputs(changed)
    diff = (sem.l - base.l).abs().amax((-1, -2))  # (B, T)
    assert float(diff[0, 2]) > 1e-3
    others = torch.ones_like(diff, dtype=torch.bool)
    others[0, 2] = False
    assert float(diff[others].max()) == 0.0
    assert float((sem.g[0] - base.g[0]).abs().max()) > 1e-3 and float((sem.g[1] - base.g[1]).abs().max()) == 0.0
    other_clip = {k: v.clone() for k, v in batch.items()}
    other_clip["frames"][1] = torch.randn_like(other_clip["frames"][1])
    other_clip["mel"][1] = torch.randn_like(other_clip["mel"][1])
    torch.testing.assert_close(model(other_clip)["logits"][0], model(batch)["logits"][0])


# ---- 7: dynamic convolution ------------------------------------------------------------------------------


def test_dynamic_conv_parameter_count_and_explicit_equivalence() -> None:
    dm = 8
    assert param_count(dm + 2, 8, 3) == (dm + 2) * 8 + 8 + 8 * 8 + 8 + 8 + 1 == 169
    torch.manual_seed(2)
    f, n, h, w = 2, 3, 5, 6
    feats, theta, ref = torch.randn(f, dm, h, w), torch.randn(f, n, 169), torch.rand(f, n, 2)
    out = dynamic_masks(feats, theta, ref)
    expected = torch.zeros(f, n, h, w)
    for fi in range(f):
        for i in range(n):
            x = torch.cat([feats[fi], relative_coords(ref[fi, i], h, w)], 0)  # (D_m + 2, h, w)
            layers = split_params(theta[fi, i][None], dm + 2)
            for k, (wt, bias) in enumerate(layers):
                x = torch.einsum("oc,chw->ohw", wt[0], x) + bias[0][:, None, None]
                x = F.relu(x) if k < len(layers) - 1 else x
            expected[fi, i] = x[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # relative coordinates are zero at the reference pixel's centre
    rel = relative_coords(torch.tensor([(3 + 0.5) / w, (1 + 0.5) / h]), h, w)
    assert rel.shape == (2, h, w) and float(rel[:, 1, 3].abs().max()) < 1e-7 and float(rel.abs().sum()) > 0


# ---- 8-9: matching, boxes ------------------------------------------------------------------------------


def test_hungarian_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    for trial in range(100):
        g = int(rng.integers(1, 6))
        cost = torch.tensor(rng.standard_normal((5, g)))
        rows, cols = hungarian(cost)
        assert sorted(cols.tolist()) == list(range(g))
        best = min(sum(float(cost[p[j], j]) for j in range(g)) for p in itertools.permutations(range(5), g))
        assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-9), trial


def test_boxes_are_exact_and_empty_masks_are_absent() -> None:
    m = torch.zeros(2, 10, 16, dtype=torch.bool)
    m[0, 2:6, 3:9] = True  # rows 2..5, columns 3..8
    box, present = masks_to_boxes(m)
    torch.testing.assert_close(box[0], torch.tensor([(3 + 9) / 32, (2 + 6) / 20, 6 / 16, 4 / 10]))
    assert present.tolist() == [True, False] and float(box[1].abs().sum()) == 0.0
    xyxy = cxcywh_to_xyxy(box[:1])
    torch.testing.assert_close(xyxy, torch.tensor([[3 / 16, 2 / 10, 9 / 16, 6 / 10]]))
    assert float(generalized_box_iou(xyxy, xyxy)) == pytest.approx(1.0)


def _perfect(masks: torch.Tensor, binary: bool, n: int, k: int, perm: list[int]) -> Prediction:
    """Predictions that are exactly right: ±20 logits, correct classes where present, exact boxes; object j is
    predicted by token perm[j], the other tokens predict nothing (empty masks, −20 scores)."""
    b, t, h, w = masks.shape
    classes, boxes, pm = torch.full((b, t, n, k), -20.0), torch.full((b, t, n, 4), 0.5), torch.full((b, t, n, h, w), -20.0)
    for bi in range(b):
        obj = clip_objects(masks[bi], binary, n)
        ob, present = masks_to_boxes(obj.masks)
        for j in range(len(obj.classes)):
            i = perm[j]
            pm[bi, :, i] = obj.masks[j] * 40 - 20
            classes[bi, :, i, obj.classes[j]] = torch.where(present[j], 20.0, -20.0)
            boxes[bi, :, i] = torch.where(present[j][:, None], ob[j], boxes[bi, :, i])
    return Prediction(classes, boxes, pm)


def test_perfect_predictions_cost_nothing_and_query_order_does_not_matter() -> None:
    masks = torch.zeros(2, 3, 16, 16, dtype=torch.long)
    masks[0, :, 2:7, 3:9] = 2
    masks[0, 1:, 9:14, 8:15] = 5  # absent in frame 0
    masks[1, 0, 4:12, 4:12] = 1
    scored = torch.ones(2, 3, dtype=torch.bool)
    crit = SetCriterion(binary=False)
    parts = crit(_perfect(masks, False, 4, 6, [2, 0]), masks, scored)
    for key in ("cls", "l1", "giou", "mask", "dice"):
        assert float(parts[key]) < 1e-6, key
    wrong = crit(_perfect(masks, False, 4, 6, [2, 0]), torch.roll(masks, 1, dims=-1), scored)
    assert float(wrong["segm"]) > 0.05
    torch.manual_seed(3)
    pred = Prediction(torch.randn(2, 3, 4, 6), torch.rand(2, 3, 4, 4) * 0.8 + 0.1, torch.randn(2, 3, 4, 16, 16))
    perm = torch.tensor([3, 1, 0, 2])
    shuffled = Prediction(pred.classes[:, :, perm], pred.boxes[:, :, perm], pred.masks[:, :, perm])
    a, b = crit(pred, masks, scored), crit(shuffled, masks, scored)
    for key in a:
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key
    binary = masks.clamp(max=1)
    bparts = SetCriterion(binary=True)(_perfect(binary, True, 3, 1, [1]), binary, scored)
    assert float(bparts["segm"]) < 1e-5


def test_absent_frames_have_no_box_loss_and_unscored_frames_no_loss() -> None:
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    masks[0, 0, 1:4, 1:5] = 1  # frame 1 empty: the object is absent there
    scored = torch.ones(1, 2, dtype=torch.bool)
    crit = SetCriterion(binary=True)
    pred = _perfect(masks, True, 2, 1, [0])
    base = crit(pred, masks, scored)
    moved = Prediction(pred.classes, pred.boxes.clone(), pred.masks)
    moved.boxes[0, 1] = 0.9
    after = crit(moved, masks, scored)
    assert float(after["l1"]) == float(base["l1"]) and float(after["giou"]) == float(base["giou"])
    moved.boxes[0, 0, 0] = 0.9  # the present frame's box does count
    assert float(crit(moved, masks, scored)["l1"]) > float(base["l1"])
    noisy = Prediction(pred.classes, pred.boxes, pred.masks.clone())
    noisy.masks[0, 1] = torch.randn(2, 8, 8)  # frame 1 not scored → no change
    only0 = torch.tensor([[True, False]])
    assert float(crit(noisy, masks, only0)["segm"]) == pytest.approx(float(crit(pred, masks, only0)["segm"]))
    assert len(clip_objects(torch.zeros(2, 4, 4, dtype=torch.long), True, 3).classes) == 0


def test_more_objects_than_tokens_keep_the_largest() -> None:
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :1, :1], masks[0, 2:5, 2:5], masks[0, 6:, 6:] = 3, 4, 7
    obj = clip_objects(masks, binary=False, max_objects=2)
    assert obj.classes.tolist() == [3, 6]  # classes 4 (9 px) and 7 (4 px), as class-head indices c − 1


# ---- 10: inference ----------------------------------------------------------------------------------------


def test_inference_from_scores() -> None:
    # AVSS: two tokens, three classes, 1×2 pixels; S_k(x) = max_i σ(c_ik)·σ(M_i(x))
    classes = torch.logit(torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.1]]))[None, None]  # (1, 1, 2, 3)
    masks = torch.logit(torch.tensor([[[0.9, 0.4]], [[0.5, 0.95]]]))[None, None]  # (1, 1, 2, 1, 2)
    pred = Prediction(classes, torch.zeros(1, 1, 2, 4), masks)
    logits = set_logits(pred, torch.ones(1, 1, dtype=torch.bool), binary=False)
    s = torch.sigmoid(logits[0, 0, 1:])  # (3, 1, 2)
    torch.testing.assert_close(s[:, 0, 0], torch.tensor([0.81, 0.4, 0.09]))
    torch.testing.assert_close(s[:, 0, 1], torch.tensor([0.36, 0.76, 0.095]))
    assert logits.argmax(2).tolist() == [[[[1, 2]]]]
    low = set_logits(Prediction(classes - 3.0, pred.boxes, masks), torch.ones(1, 1, dtype=torch.bool), binary=False)
    assert low.argmax(2).tolist() == [[[[0, 0]]]]  # no S_k above 0.5 → background
    assert set_logits(pred, torch.ones(1, 1, dtype=torch.bool), False, bg_threshold=0.3).argmax(2).tolist() == [[[[1, 2]]]]
    # binary: the token with the highest mean score over the real frames
    scores = torch.logit(torch.tensor([[[0.2], [0.6]], [[0.9], [0.4]], [[0.0001], [0.9]]]))[None]  # (1, T=3, N=2, 1)
    bm = torch.randn(1, 3, 2, 4, 4)
    valid = torch.tensor([[True, True, False]])
    out = set_logits(Prediction(scores, torch.zeros(1, 3, 2, 4), bm), valid, binary=True)
    torch.testing.assert_close(out[:, :, 0], bm[:, :, 0])  # token 0: (0.2 + 0.9)/2 > (0.6 + 0.4)/2 over the real frames
    out = set_logits(Prediction(scores, torch.zeros(1, 3, 2, 4), bm), torch.ones(1, 3, dtype=torch.bool), binary=True)
    torch.testing.assert_close(out[:, :, 0], bm[:, :, 1])  # with the third frame token 1 wins


# ---- 11: ablation switches ------------------------------------------------------------------------------


def test_ablation_switches() -> None:
    torch.manual_seed(4)
    plain = tiny_qd("avss", frozenset({"quant"})).train()
    assert not hasattr(plain, "vq")
    batch = make_batch(plain.cfg, n_real=[5, 10])
    parts = plain.loss(plain(batch), batch)
    assert "quant" not in parts and "vq_commit" not in parts
    _, sem = plain.outputs(batch)
    assert sem.g_idx is None and torch.equal(sem.l_hat, sem.l)
    nolocal = tiny_qd("avss", frozenset({"local"})).eval()
    assert not hasattr(nolocal, "local_asd")
    _, sem = nolocal.outputs(batch)
    audio = nolocal.audio(batch["mel"])
    queries = nolocal.decoder_queries(sem, audio).view(2, 10, 3, -1)
    for t in range(10):
        torch.testing.assert_close(queries[:, t], sem.g_hat)
    base = tiny_qd("avss", frozenset({"decompose"}))
    assert not any(hasattr(base, m) for m in ("av_fuse", "global_asd", "vq", "avsr", "local_asd"))
    noavsr = tiny_qd("avss", frozenset({"avsr"}))
    assert not hasattr(noavsr, "avsr") and hasattr(noavsr, "vq")
    for model in (base.train(), noavsr.train()):
        out = model(batch)
        assert out["logits"].shape == (2, 10, 71, 64, 64) and torch.isfinite(model.loss(out, batch)["total"])


# ---- plumbing ----------------------------------------------------------------------------------------


def test_logits_shapes_and_padded_frames_do_not_change_real_frames() -> None:
    torch.manual_seed(5)
    for dataset, k in (("s4", 1), ("avss", 71)):
        model = tiny_qd(dataset).train()
        t = model.cfg.frames
        batch = make_batch(model.cfg, n_real=[t // 2, t])
        out = model(batch)
        assert out["logits"].shape == (2, t, k, 64, 64)
        parts = model.loss(out, batch)
        assert {"total", "segm", "cls", "l1", "giou", "mask", "dice", "quant", "vq_codebook", "vq_commit", "vq_local"} <= parts.keys()
        parts["total"].backward()
        for name in ("backbone", "pixel_decoder", "audio", "av_fuse", "global_asd", "local_asd", "avsr", "segm", "controller"):
            grad = sum(float(p.grad.abs().sum()) for p in getattr(model, name).parameters() if p.grad is not None)
            assert grad > 0, name
        assert float(model.vq.codebook.grad.abs().sum()) > 0
        model.eval()
        assert set(model(batch)) == {"logits"}
        padded = {k_: v.clone() for k_, v in batch.items()}
        padded["frames"][0, t // 2:] = torch.randn_like(padded["frames"][0, t // 2:])
        padded["mel"][0, t // 2:] = torch.randn_like(padded["mel"][0, t // 2:])
        torch.testing.assert_close(model(padded)["logits"][0, : t // 2], model(batch)["logits"][0, : t // 2])


def test_registry_refuses_foreign_components_and_options() -> None:
    spec = methods.get("qdformer")
    assert spec.components == {"quant", "avsr", "local", "decompose"}
    cfg = ModelConfig(method="qdformer", ablate=frozenset({"mit"}))
    with pytest.raises(ValueError, match="decompose.*local.*quant"):
        methods.validate(cfg)
    with pytest.raises(ValueError, match="unknown option.*'nope'.*codebook_size"):
        methods.validate(ModelConfig(method="qdformer", options={"nope": 1}))
    with pytest.raises(ValueError, match="avsr_act"):
        QDFormerOptions(avsr_act="tanh")


def test_heads_start_from_the_detr_prior_and_a_zeroed_box_layer() -> None:
    """R2VOS's initialisation: σ(class bias) = 0.01 on every class, and every token's box starts at centre (0.5, 0.5)
    with size σ(−2) whatever the input (the box MLP's last layer is zero but for the w/h bias)."""
    torch.manual_seed(8)
    for dataset in ("s4", "avss"):
        model = tiny_qd(dataset).train()
        torch.testing.assert_close(model.class_head.bias.sigmoid(), torch.full_like(model.class_head.bias, 0.01))
        preds, _ = model.outputs(make_batch(model.cfg, seed=3))
        expected = torch.tensor([0.5, 0.5, 1 / (1 + np.exp(2.0)), 1 / (1 + np.exp(2.0))], dtype=torch.float32)
        for pred in preds:
            torch.testing.assert_close(pred.boxes, expected.expand_as(pred.boxes))


def test_paper_mask_dim_gives_r2vos_dynamic_conv_size() -> None:
    """D_m = 256 (R2VOS ``--mask_dim``): the dynamic conv reads 256 + 2 channels, θ has (258·8 + 8) + (8·8 + 8) +
    (8 + 1) = 2153 numbers per token."""
    model = tiny_qd("s4", mask_dim=256)
    assert model.mask_proj.out_channels == 256
    assert model.controller.net[-1].out_features == param_count(258, 8, 3) == 2153


def test_aux_loss_adds_every_layer() -> None:
    torch.manual_seed(6)
    model = tiny_qd("s4", aux_loss=True).train()
    batch = make_batch(model.cfg)
    out = model(batch)
    assert len(out["preds"]) == model.cfg.dec_layers
    parts = model.loss(out, batch)
    assert float(parts["aux"]) > 0
    assert float(parts["total"]) == pytest.approx(float(parts["segm"] + parts["aux"] + 0.5 * parts["quant"]), rel=1e-5)


@pytest.mark.parametrize(("options", "message"), [
    ({"codebook_size": 0}, "method qdformer: codebook_size must be at least 1, got 0"),
    ({"num_tokens": 2.5}, "method qdformer: num_tokens must be an integer, got 2.5"),
    ({"vq_restart": -1}, "method qdformer: vq_restart must be at least 0, got -1"),
    ({"vq_restart": True}, "method qdformer: vq_restart must be an integer, got True"),
    ({"vq_buffer": 0}, "method qdformer: vq_buffer must be at least 1, got 0"),
    ({"avsr_act": "tanh"}, "method qdformer: avsr_act must be one of none, sigmoid, got 'tanh'"),
    ({"vq_init": "kmeans"}, "method qdformer: vq_init must be one of normal, first_batch, got 'kmeans'"),
    ({"bg_threshold": 1.0}, "method qdformer: bg_threshold must lie in (0, 1), got 1.0"),
])
def test_bad_options_give_one_clear_error(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        methods.get("qdformer").parse_options(options)
