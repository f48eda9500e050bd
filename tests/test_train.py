"""Tests of train.py, in layers: the loss on hand-computed tensors; the chunked log-prob against the
plain log_softmax; gradients that do not depend on micro-batch size or on how rows split over ranks;
argument checks; then the tiny model end to end: resume equivalence, a non-finite loss, SIGTERM,
a 2-process gloo torchrun run per method (DDP) and one with FSDP2, and the demo learning (GRPO gains
at least 0.1 greedy accuracy at a fixed seed; shuffled rewards do not).
"""
import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import rollout
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT,
       "TRANSFORMERS_VERBOSITY": "error"}


# ----------------------------------------------------------------------------------------------
# The loss on fixed tensors, computed by hand


def test_ppo_clip_and_dual_clip_by_hand():
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 4.0, 1.1], requires_grad=True)
    A = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 2.0])
    loss, clipped, dual = train.ppo_clip_loss(ratio, A, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    expected = [
        -min(1.5 * 1, 1.28 * 1),     # A > 0, r above 1 + eps_high: clipped
        -min(0.5 * 1, 0.8 * 1),      # A > 0, r below 1 - eps_low: the unclipped term is the min
        -min(0.5 * -1, 0.8 * -1),    # A < 0, r below 1 - eps_low: clipped
        -min(1.5 * -1, 1.28 * -1),   # A < 0, r above 1 + eps_high: unclipped (pessimistic)
        min(-min(4.0 * -1, 1.28 * -1), 3.0 * 1),  # A < 0, r = 4 > c: the dual clip caps at c |A|
        -min(1.1 * 2, 1.1 * 2),      # inside the clip range
    ]
    assert loss.tolist() == pytest.approx(expected)
    assert clipped.tolist() == [True, False, True, False, False, False]
    assert dual.tolist() == [False, False, False, False, True, False]
    loss.sum().backward()
    assert ratio.grad.tolist() == pytest.approx([0.0, -1.0, 0.0, 1.0, 0.0, -2.0])  # clipped tokens pass no gradient
    no_dual, _, none = train.ppo_clip_loss(ratio.detach(), A, 0.2, 0.28, dual_clip=0.0)
    assert no_dual[4].item() == pytest.approx(4.0) and not none.any()


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).float()
    ones = torch.ones_like(per_token)

    def agg(kind, weight=ones):
        N = train.loss_normaliser(mask, weight, kind, max_len=4)
        return train.aggregate(per_token, mask, weight, kind, N).item()

    assert agg("token-mean") == pytest.approx((1 + 2 + 4) / 3)
    assert agg("seq-mean") == pytest.approx(((1 + 2) / 2 + 4 / 1) / 2)
    assert agg("max-len") == pytest.approx((1 + 2 + 4) / (2 * 4))  # Dr. GRPO: rows x max_new_tokens
    w = torch.tensor([[1.0, 0.5, 7.0], [0.25, 7.0, 7.0]])  # unique segments: weights 1/n(s)
    assert agg("token-mean", w) == pytest.approx((1 * 1 + 2 * 0.5 + 4 * 0.25) / (1 + 0.5 + 0.25))


def test_gspo_token_ratio_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.3, -2.1, -3.0], [-0.4, -0.7, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ratio = train.policy_ratio(logp, old, mask, "gspo")
    s1, s2 = math.exp((0.3 + 0.1 + 0.0) / 3), math.exp((-0.1 + 0.0) / 2)  # the padded position is ignored
    assert ratio[0].tolist() == pytest.approx([s1] * 3)
    assert ratio[1, :2].tolist() == pytest.approx([s2] * 2)
    (ratio * mask).sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([s1] * 3 + [s2, s2, 0.0])  # d s_{i,t} / d log pi(o_t) = s_i
    token = train.policy_ratio(logp.detach(), old, mask, "grpo")
    assert token[0].tolist() == pytest.approx([math.exp(0.3), math.exp(0.1), 1.0])


def test_k3_kl_and_full_loss_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    k3 = 0.25 / 0.5 - math.log(0.25 / 0.5) - 1
    assert train.k3_kl(logp, ref)[0].tolist() == pytest.approx([k3, 0.0])
    # ratio 1 everywhere (old = current): the PPO term is -A; token mean over the 2 tokens, plus 0.1 * k3
    A, mask = torch.tensor([[1.0, -3.0]]), torch.ones(1, 2, dtype=torch.bool)
    loss, stats = train.policy_loss(logp, logp, A, mask, torch.ones(1, 2), 2.0, kl_coef=0.1, ref_logp=ref)
    assert loss.item() == pytest.approx((-1.0 + 3.0) / 2 + 0.1 * (k3 + 0.0) / 2)
    assert stats["kl_ref"].item() == pytest.approx(k3) and stats["clipped"].item() == 0


def test_k3_kl_is_masked_before_the_exponential_and_bounded():
    """A padding position's log-prob can be anything (the issue: -120 at temperature 0.1, here -1e4):
    there exp(ref - logp) overflowed and inf * 0 made the loss NaN. Masked first, it is 0; a real
    token that far off is bounded (KL_BOUND) and passes no gradient."""
    logp = torch.tensor([[-0.5, -1e4, -1e4]], requires_grad=True)
    ref = torch.tensor([[-0.7, 0.0, -1.0]])
    mask = torch.tensor([[True, True, False]])
    kl = train.k3_kl(logp, ref, mask)
    d0 = -0.7 + 0.5
    assert kl.tolist()[0] == pytest.approx([math.exp(d0) - d0 - 1, train.KL_BOUND, 0.0])
    A, weight = torch.zeros(1, 3), torch.ones(1, 3)
    loss, stats = train.policy_loss(logp, ref, A, mask, weight, 2.0, kl_coef=0.1, ref_logp=ref)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(float(v)) for v in stats.values())
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1:].tolist() == [0.0, 0.0]


def test_kl_gradient_matches_autograd_of_an_independent_k3():
    g = torch.Generator().manual_seed(0)
    logp = (-3 * torch.rand(4, 6, generator=g)).requires_grad_()
    ref = -3 * torch.rand(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    N, coef = float(mask.sum()), 0.2
    # A = 0: the PPO term and its gradient vanish, what is left is the KL term
    loss, stats = train.policy_loss(logp, logp.detach(), torch.zeros(4, 6), mask, torch.ones(4, 6), N,
                                    kl_coef=coef, ref_logp=ref)
    loss.backward()
    x = logp.detach().clone().requires_grad_()
    r = (ref - x)[mask]
    (coef * (r.exp() - r - 1).sum() / N).backward()  # k3, written out
    torch.testing.assert_close(logp.grad, x.grad, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(logp.grad, torch.where(mask, coef * (1 - (ref - logp.detach()).exp()) / N, 0.0))
    assert stats["kl_ref"].item() == pytest.approx(float((r.exp() - r - 1).sum().detach()))


def test_ratio_and_loss_finite_whatever_padding_holds():
    logp = torch.tensor([[-1.0, -1e4], [-2.0, 50.0]], requires_grad=True)
    old = torch.tensor([[-1.1, 1e4], [-2.0, -1e4]])
    mask = torch.tensor([[True, False], [True, False]])
    for objective in ("grpo", "gspo"):
        loss, stats = train.policy_loss(logp, old, torch.ones(2, 2), mask, torch.ones(2, 2), 2.0, objective=objective)
        loss.backward()
        assert math.isfinite(loss.item()) and math.isfinite(stats["approx_kl"].item())
        assert torch.isfinite(logp.grad).all() and logp.grad[:, 1].tolist() == [0.0, 0.0]
        logp.grad = None


def test_gspo_token_ratio_differs_between_copies_of_a_shared_token():
    """Two leaves share their first token (same context, same pi and pi_old there): the token ratio is the
    same for both copies, the GSPO-token ratio is each row's s_i, not the same (policy_ratio's docstring)."""
    logp = torch.tensor([[-1.0, -0.2, -0.3], [-1.0, -2.5, -3.0]])
    old = torch.tensor([[-1.2, -0.9, -0.8], [-1.2, -1.0, -1.1]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    token = train.policy_ratio(logp, old, mask, "grpo")
    gspo = train.policy_ratio(logp, old, mask, "gspo")
    assert token[0, 0] == token[1, 0]
    assert gspo[0, 0].item() == pytest.approx(math.exp((0.2 + 0.7 + 0.5) / 3))
    assert gspo[1, 0].item() == pytest.approx(math.exp((0.2 - 1.5 - 1.9) / 3)) and gspo[0, 0] > 1 > gspo[1, 0]


def test_gspo_paper_is_one_flag_and_other_flags_still_win(tmp_path):
    args = train.parse_args(["--gspo-paper", "--out", str(tmp_path)])
    assert (args.objective, args.loss_agg, args.clip_low, args.clip_high, args.dual_clip) == ("gspo", "seq-mean", 3e-4, 4e-4, 0)
    train.check_args(args)
    assert train.parse_args(["--gspo-paper", "--clip-high", "1e-3"]).clip_high == 1e-3
    with pytest.raises(ValueError, match="--gspo-paper"):
        train.check_args(train.parse_args(["--gspo-paper", "--objective", "grpo", "--out", str(tmp_path)]))


def test_lr_warmup_by_hand():
    args = train.Args(lr=1.0, warmup_steps=4)
    assert [train.lr_at(s, args) for s in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert [train.lr_at(s, train.Args(lr=0.5)) for s in (0, 9)] == [0.5, 0.5]


# ----------------------------------------------------------------------------------------------
# Log-probs: the chunked LM head, the packed rows, against a plain full forward


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_head_logprobs_equal_log_softmax_values_and_gradients(dtype, tol):
    """The chunked head (chunks of 4 over 15 positions: a ragged end) against log_softmax of the whole
    logits, in fp32 and under bf16 autocast (the logits rounded to bf16 as the LM head rounds them)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(15, 8, generator=g).requires_grad_()
    W = (0.5 * torch.randn(11, 8, generator=g)).requires_grad_()
    y = torch.randint(11, (15,), generator=g)
    up = torch.randn(15, generator=g)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    with ctx:
        lp = train.head_logprobs(h, W, y, temperature=0.7, chunk=4)
    (lp * up).sum().backward()
    h2, W2 = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    with ctx:
        logits = F.linear(h2, W2)
    ref = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, y[:, None])[:, 0]
    (ref * up).sum().backward()
    assert lp.dtype == torch.float32 and h.grad.dtype == W.grad.dtype == torch.float32
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(W.grad, W2.grad, atol=tol, rtol=tol)


def _plain_logprobs(model, batch, temperature):
    """Row by row: model(prompt + response) with no padding at all, log_softmax(logits / T) at the
    position before each response token, [B, T] with 0 at padding."""
    out = torch.zeros(batch["response_mask"].shape)
    for i in range(out.shape[0]):
        q = batch["prompt_ids"][i][batch["prompt_mask"][i]]
        o = batch["response_ids"][i][batch["response_mask"][i]]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([q, o])[None]).logits[0].float()
        lp = torch.log_softmax(logits / temperature, -1)
        out[i, :len(o)] = lp[len(q) - 1 + torch.arange(len(o)), o]
    return out


@pytest.mark.parametrize("budget", [10_000, 12])
def test_response_logprobs_equal_a_plain_forward_at_every_response_position(tiny_model, budget):
    """An off-by-one in the shift (position plen - 1 + t predicts token t), a row packed with the wrong
    prompt or a misplaced padding makes these differ. Budget 12: one or two rows per micro-batch."""
    model = copy.deepcopy(tiny_model).eval()
    batch = _random_batch()
    args = train.Args(micro_batch_tokens=budget, micro_batch_rows=64, temperature=0.8, logit_chunk=5)
    lp = train.batch_logprobs(model, batch, args, contextlib.nullcontext())
    torch.testing.assert_close(lp, _plain_logprobs(model, batch, 0.8), atol=2e-6, rtol=1e-5)
    assert (lp[~batch["response_mask"]] == 0).all()


def test_micro_batches_by_token_budget():
    lengths = [5, 30, 7, 30, 12, 3, 29, 8]
    plans = train.plan_micro_batches(lengths, max_tokens=60, max_rows=3)
    assert sorted(i for p in plans for i in p) == list(range(8))  # every row once
    for p in plans:
        assert len(p) <= 3 and (len(p) == 1 or len(p) * max(lengths[i] for i in p) <= 60)
    assert [lengths[i] for p in plans for i in p] == sorted(lengths, reverse=True)  # longest first
    assert train.plan_micro_batches([100, 2], max_tokens=50, max_rows=8) == [[0], [1]]  # too long: alone


def test_micro_batches_bound_the_padding_with_few_micro_batches():
    """Greedy packing to the budget gives [100, 60, 60], [60, 60]: 420 positions for 340 real; the plan keeps
    padding <= 10% of max(real, budget) and, within that, takes the fewest micro-batches (not one row each)."""
    assert train.plan_micro_batches([60, 100, 60, 60, 60], max_tokens=300, max_rows=8) == [[1], [0, 2, 3, 4]]
    assert train.plan_micro_batches([100, 95, 60, 58], max_tokens=300, max_rows=8) == [[0, 1], [2, 3]]  # 320 for 313
    assert train.plan_micro_batches([100, 60, 60, 60], 10**6, 8) == [[0, 1, 2, 3]]  # padding 120 < 10% of a budget
    assert train.plan_micro_batches([10] * 12, max_tokens=35, max_rows=8) == [[0, 1, 2], [3, 4, 5], [6, 7, 8],
                                                                              [9, 10, 11]]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 300, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
        plans = train.plan_micro_batches(lengths, max_tokens=1000, max_rows=6, max_padding=0.1)
        assert sorted(i for p in plans for i in p) == list(range(len(lengths)))
        assert [lengths[i] for p in plans for i in p] == sorted(lengths, reverse=True)
        assert all(len(p) <= 6 and len(p) * lengths[p[0]] <= 1000 for p in plans)
        real = sum(lengths)
        assert sum(len(p) * lengths[p[0]] for p in plans) - real <= 0.1 * max(real, 1000)
        loose = train.plan_micro_batches(lengths, max_tokens=1000, max_rows=6, max_padding=100.0)
        assert len(loose) <= len(plans)  # a looser bound never needs more micro-batches


def test_micro_batches_are_as_many_on_every_rank(monkeypatch):
    """Under FSDP2 every forward is a collective: a rank with fewer micro-batches than another would hang it.
    micro_batches splits this rank's largest micro-batches until it has the most any rank has (here 5)."""
    lengths = [30, 30, 29, 12, 8, 7, 5, 3]
    mask = torch.zeros(8, 40, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    batch = {"response_mask": mask, "prompt_len": torch.zeros(8, dtype=torch.long)}
    monkeypatch.setattr(train, "row_lengths", lambda b: lengths)
    args = train.Args(micro_batch_tokens=120, micro_batch_rows=8)
    alone = train.micro_batches(batch, args)  # one process: the plan itself
    assert alone == train.plan_micro_batches(lengths, 120, 8) and len(alone) == 3
    monkeypatch.setattr(train, "all_reduce", lambda x, op=None: x.fill_(5))  # another rank has 5
    plans = train.micro_batches(batch, args)
    assert len(plans) == 5 and all(plans)
    assert sorted(i for p in plans for i in p) == list(range(8))  # every row once: the same gradient sum
    monkeypatch.setattr(train, "all_reduce", lambda x, op=None: x.fill_(9))  # more than its 8 rows
    with pytest.raises(RuntimeError, match="9 micro-batches"):
        train.micro_batches(batch, args)


def test_bench_update_padding_counts():
    """benchmarks/bench_update.py's padding section on a small modelled step: every row planned once, AFTER
    within the padding bound and below BEFORE's consecutive-row padding."""
    from benchmarks import bench_update
    args = bench_update.parse_args(["--prompts", "8", "--mini-batch-prompts", "16", "--world", "4"])
    plen, rlen = bench_update.modelled_lengths(args)
    assert len(plen) == 8 * args.G and max(plen) <= 1024 and max(rlen) <= 2048
    real = sum(p + r - 1 for p, r in zip(plen, rlen))
    res = bench_update.count_positions(plen, rlen, 4 * args.G, args)
    assert real <= res["after"][0] <= 1.1 * real < res["before"][0]
    assert res["before"][1] == 2 * -(-4 * args.G // args.old_micro_batch_rows)  # 2 mini-batches of 28 rows, 8 at a time


# ----------------------------------------------------------------------------------------------
# Gradients: independent of micro-batch size and of how the rows split over ranks


def _random_batch(B=8, Tp=5, T=6, V=100, seed=0):
    """Prompts left-padded and responses right-padded to different lengths, advantages and old log-probs."""
    g = torch.Generator().manual_seed(seed)
    plen, rlen = torch.randint(2, Tp + 1, (B,), generator=g), torch.randint(1, T + 1, (B,), generator=g)
    prompt_mask = torch.arange(Tp) >= (Tp - plen)[:, None]
    response_mask = torch.arange(T) < rlen[:, None]
    return dict(prompt_ids=torch.randint(3, V, (B, Tp), generator=g) * prompt_mask,
                prompt_mask=prompt_mask, response_ids=torch.randint(3, V, (B, T), generator=g) * response_mask,
                response_mask=response_mask, A=torch.randn(B, T, generator=g) * response_mask,
                weight=torch.rand(B, T, generator=g) + 0.5)


def _grads(model, batch, args, rows_per_rank):
    """Summed gradients of the batch's rows split into 'ranks' of rows_per_rank rows, each with the global normaliser."""
    model.zero_grad(set_to_none=True)
    N = train.loss_normaliser(batch["response_mask"], batch["weight"], args.loss_agg, args.max_new_tokens)
    for s in range(0, batch["A"].shape[0], rows_per_rank):
        part = {k: v[s:s + rows_per_rank] for k, v in batch.items()}
        train.accumulate_gradients(model, part, N, args, 1, contextlib.nullcontext())
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("agg,objective", [("token-mean", "grpo"), ("seq-mean", "gspo"), ("max-len", "grpo")])
def test_gradient_independent_of_micro_batches_and_ranks(tiny_model, agg, objective):
    """Rows split over 'ranks' and packed into micro-batches by rows or by a token budget (sorted by
    length): the gradient is the one-micro-batch gradient, because every part divides by the global
    normaliser (a per-micro-batch mean, or a seq-mean divided by the micro-batch's rows, fails this)."""
    model = copy.deepcopy(tiny_model).train()
    batch = _random_batch()
    lp = train.batch_logprobs(model, batch, train.Args(), contextlib.nullcontext())
    g = torch.Generator().manual_seed(1)
    batch["old_logp"] = (lp + 0.3 * torch.randn(lp.shape, generator=g)) * batch["response_mask"]  # ratios != 1: some clip
    base = dict(loss_agg=agg, objective=objective, max_new_tokens=6, temperature=0.8, logit_chunk=7)
    full = _grads(model, batch, train.Args(micro_batch_rows=8, **base), rows_per_rank=8)
    for rows, tokens, ranks in [(1, 10_000, 8), (4, 10_000, 8), (3, 10_000, 4), (1, 10_000, 2), (64, 20, 8),
                                (64, 12, 4), (2, 25, 8)]:
        other = _grads(model, batch, train.Args(micro_batch_rows=rows, micro_batch_tokens=tokens, **base), ranks)
        for a, b in zip(full, other):
            torch.testing.assert_close(a, b, atol=2e-7, rtol=1e-4)
    assert sum(float(a.abs().sum()) for a in full) > 0


def test_second_epoch_uses_the_stored_old_logprobs(tiny_model, monkeypatch):
    """--epochs 2: the second epoch's ratio is pi / pi_old with the log-probs stored before the first
    epoch; recomputing them (ratio 1 again, nothing clipped, no trust region) fails this."""
    model = copy.deepcopy(tiny_model).train()
    batch = _random_batch()
    args = train.Args(epochs=2, group_size=2, mini_batch_prompts=4, temperature=0.8, lr=1e-2)  # 8 rows: 1 mini-batch
    batch["old_logp"] = train.batch_logprobs(model, batch, args, contextlib.nullcontext())
    stored = batch["old_logp"].clone()
    seen, real = [], train.policy_loss

    def spy(logp, old_logp, *a, **k):
        seen.append((logp.detach().clone(), old_logp.clone()))
        return real(logp, old_logp, *a, **k)
    monkeypatch.setattr(train, "policy_loss", spy)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    out = train.update_policy(model, opt, batch, args, 1, args.lr, contextlib.nullcontext)
    assert len(seen) == 2 and out["updates"] == 2 and out["skipped"] == 0
    (lp1, old1), (lp2, old2) = seen
    mask = batch["response_mask"][:, :lp1.shape[1]]
    rows = [i for p in train.plan_micro_batches(train.row_lengths(batch), 10**9, 64) for i in p]
    torch.testing.assert_close(old1, stored[rows][:, :lp1.shape[1]])
    torch.testing.assert_close(lp1, old1, atol=1e-5, rtol=0)  # the first epoch starts at ratio 1
    assert torch.equal(old2, old1)  # the second epoch still divides by the stored old policy
    assert (lp2 - old2)[mask[rows]].abs().max() > 1e-3  # while the policy has moved


def test_nonfinite_gradient_skips_the_update(tiny_model):
    model = copy.deepcopy(tiny_model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    next(model.parameters()).grad[0, 0] = float("nan")
    norm, skipped = train.apply_update(model, opt, 0.1, 1.0, loss_finite=True)
    assert skipped and math.isnan(norm)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    norm, skipped = train.apply_update(model, opt, 0.1, 1.0, loss_finite=True)
    assert not skipped and norm > 1 and not torch.equal(before[0], next(model.parameters()))


# ----------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("argv,words", [
    (["--method", "nope"], "--method"),
    (["--group-size", "1"], "--group-size"),
    (["--prompts-per-step", "10", "--mini-batch-prompts", "4"], "--mini-batch-prompts"),
    (["--unique-segments"], "--unique-segments"),
    (["--td-weight", "0.5"], "--td-weight"),
    (["--temperature", "0"], "--temperature"),
    (["--loss-agg", "sum"], "--loss-agg"),
    (["--dual-clip", "0.5"], "--dual-clip"),
    (["--task", "nope"], "--task"),
])
def test_invalid_arguments_rejected_before_loading(argv, words, tmp_path):
    args = train.parse_args(argv + ["--out", str(tmp_path)])
    with pytest.raises(ValueError, match=words):
        train.check_args(args)


def test_world_size_must_divide_mini_batch(tmp_path):
    args = train.parse_args(["--mini-batch-prompts", "6", "--prompts-per-step", "12", "--out", str(tmp_path)])
    train.check_args(args, world_size=2)
    with pytest.raises(ValueError, match="ranks"):
        train.check_args(args, world_size=4)


def test_demo_defaults_and_flags_win():
    args = train.parse_args(["--demo", "--steps", "7", "--method", "tempo"])
    assert (args.steps, args.method, args.task, args.lr, args.model) == (7, "tempo", "add", 2e-4, "tiny")
    assert args.out == os.path.join("runs", "demo-tempo")
    plain = train.parse_args([])
    assert (plain.model, plain.task, plain.group_size, plain.lr, plain.clip_high) == ("Qwen/Qwen3-1.7B", "math", 7, 1e-6, 0.28)


# ----------------------------------------------------------------------------------------------
# End to end on the tiny model


@pytest.fixture(scope="session")
def warm_dir(tmp_path_factory):
    """The demo's warm-started tiny model (hidden 128 x 4, supervised on `add` to 30% greedy accuracy)."""
    return train.warm_start(train.parse_args(["--demo", "--warm-dir", str(tmp_path_factory.mktemp("warm") / "w")]))


def _small(out, model, *extra):
    return ["--model", model, "--task", "add", "--group-size", "4", "--prompts-per-step", "8",
            "--mini-batch-prompts", "4", "--micro-batch-rows", "8", "--max-new-tokens", "6", "--lr", "3e-4",
            "--val-every", "0", "--sample-every", "0", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


VOLATILE = ("t_", "wall_s", "tokens_per_s", "decode_tokens_per_s", "update_tokens_per_s", "peak_mem_gb")


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _checkpoint_tensors(ckpt: str, scratch: str) -> tuple[dict, dict]:
    """(the exported model.safetensors, the sharded state/ read back into one flat dict of tensors)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(os.path.join(ckpt, "state"), scratch)
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(x, (list, tuple)):
            for k, v in enumerate(x):
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = x
    walk("", torch.load(scratch, weights_only=False))
    return load_file(os.path.join(ckpt, "model.safetensors")), flat


def _assert_same_checkpoint(a: str, b: str, scratch):
    """Bit for bit: the exported weights, and the model and every optimizer state (step, exp_avg, exp_avg_sq)."""
    (wa, sa), (wb, sb) = _checkpoint_tensors(a, str(scratch / "a.pt")), _checkpoint_tensors(b, str(scratch / "b.pt"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sa.keys() == sb.keys() and any("exp_avg_sq" in k for k in sa)
    for k in sa:
        same = torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]
        assert same, k
    for k, w in wa.items():  # the export holds the trained model, as the sharded state does
        assert torch.equal(w, sa[f"/model/{k}"])


def test_resume_continues_exactly(warm_dir, tmp_path):
    extra = ["--epochs", "2", "--save-every", "2", "--method", "tempo", "--max-new-tokens", "4"]
    straight = train.train(train.parse_args(_small(tmp_path / "a", warm_dir, "--steps", "4", *extra)))
    train.train(train.parse_args(_small(tmp_path / "b", warm_dir, "--steps", "2", *extra)))
    resumed = train.train(train.parse_args(_small(tmp_path / "b", warm_dir, "--steps", "4", "--resume", *extra)))
    assert straight["steps"] == resumed["steps"] == 4
    a, b = train.read_metrics(tmp_path / "a"), train.read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert _stable(a) == _stable(b)
    assert any(r["adv_abs_mean"] > 0 for r in a) and any(r["grad_norm"] > 0 for r in a)  # it did train
    _assert_same_checkpoint(*(train.latest_checkpoint(str(tmp_path / x)) for x in "ab"), tmp_path)
    assert sorted(n for n in os.listdir(tmp_path / "b") if n.startswith("ckpt")) == ["ckpt-000004"]  # keep_last 1
    png = train.plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "runs.png"))
    assert os.path.getsize(png) > 10_000


def test_nonfinite_loss_is_skipped_then_stops(tiny_model_dir, tmp_path, monkeypatch):
    real = train.policy_loss

    def nan_loss(*a, **k):
        loss, stats = real(*a, **k)
        return loss * float("nan"), stats
    monkeypatch.setattr(train, "policy_loss", nan_loss)
    args = train.parse_args(_small(tmp_path, tiny_model_dir, "--steps", "5", "--max-nonfinite", "2", "--save-every", "0"))
    with pytest.raises(RuntimeError, match="non-finite"):
        train.train(args)
    rows = train.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(r["skipped_updates"] == 2 for r in rows)


def test_one_step_builds_the_prefix_tree_once(tiny_model_dir, tmp_path, monkeypatch):
    """TreeAdv's advantages, the SPEC 8 diagnostics and --unique-segments' weights share one tree a step:
    a second pairwise_lcp (anything rebuilding it, or a tree slice that does not fit) fails here."""
    calls, real = [], train.advantages.pairwise_lcp

    def counting(responses, *a, **k):
        calls.append(responses.shape[0])
        return real(responses, *a, **k)
    monkeypatch.setattr(train.advantages, "pairwise_lcp", counting)
    args = train.parse_args(_small(tmp_path, tiny_model_dir, "--steps", "1", "--method", "treeadv",
                                   "--unique-segments", "--save-every", "0"))
    train.train(args)
    assert [r["step"] for r in train.read_metrics(tmp_path)] == [1]
    assert calls == [8 * 4]  # once, on the whole step's batch (prompts-per-step x group-size rows)


def test_kl_at_low_temperature_trains(warm_dir, tmp_path):
    """The issue's reproduction: the warm-started model at temperature 0.1 gives the pad token a log-prob
    near -120 (logits / 0.1), exp(ref - logp) overflowed at padding, every update was skipped and the run
    stopped after 3 steps (RuntimeError); approx_kl was NaN on every step even without KL."""
    args = train.parse_args(_small(tmp_path, warm_dir, "--steps", "3", "--kl-coef", "0.05", "--temperature", "0.1",
                                   "--save-every", "0"))
    train.train(args)
    rows = train.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["skipped_updates"] == 0 for r in rows)
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "grad_norm", "approx_kl", "kl_ref"))


def test_reference_is_frozen_in_eval_mode_and_at_the_policys_precision(warm_dir, tmp_path, monkeypatch):
    """Every reference forward sees a frozen model in eval mode; the reference never changes; and it runs at
    the policy's precision (fp32 weights under the same bf16 autocast), so before the first update its
    log-probs equal the policy's: KL 0 on step 1's single update (a bf16-weights reference fails this)."""
    seen, real = [], train.batch_logprobs

    def spy(model, batch, args, ctx):
        seen.append((model, model.training, any(p.requires_grad for p in model.parameters()),
                     any(m.training for m in model.modules())))
        return real(model, batch, args, ctx)
    monkeypatch.setattr(train, "batch_logprobs", spy)  # old log-probs are the sampler's: every call is the reference's
    args = train.parse_args(_small(tmp_path, warm_dir, "--steps", "2", "--kl-coef", "0.05", "--dtype", "bf16",
                                   "--recompute-logprobs", "never", "--mini-batch-prompts", "8", "--save-every", "0"))
    train.train(args)
    assert len(seen) == 2 and all(s[0] is seen[0][0] for s in seen)
    assert not any(training or grad or any_training for _, training, grad, any_training in seen)
    initial = rollout.load_model_and_tokenizer(warm_dir)[0].state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in seen[0][0].state_dict().items())
    rows = train.read_metrics(tmp_path)
    assert rows[0]["kl_ref"] < 1e-6 < rows[1]["kl_ref"]
    assert rows[0]["old_logp_diff_max"] > 0 and math.isfinite(rows[0]["old_logp_diff_mean"])  # bf16 decode vs update


@pytest.mark.parametrize("tied", [True, False])
def test_export_is_what_from_pretrained_loads(tiny_tokenizer, tmp_path, tied):
    """export_pretrained's hand-written safetensors (header first, then one tensor at a time) load with
    from_pretrained into the same model, tied head (written once, as save_pretrained does) or not."""
    from transformers import AutoModelForCausalLM
    model = rollout.build_tiny_model(tiny_tokenizer, hidden=32, layers=1, seed=3)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)
    train.export_pretrained(model, tiny_tokenizer, str(tmp_path), train.Worker())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ref = model.state_dict()
    assert loaded.state_dict().keys() == ref.keys() and all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "train.py", *_small(tmp_path, tiny_model_dir, "--steps", "100000", "--save-every", "1000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    last = train.read_metrics(tmp_path)[-1]["step"]
    ckpt = train.latest_checkpoint(str(tmp_path))
    assert ckpt.endswith(f"ckpt-{last:06d}") and "stopped at step" in out
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        assert json.load(f)["step"] == last


TORCHRUN = {  # one launch per method, each also covering other options; plus FSDP2
    "grpo": ["--method", "grpo", "--scale", "batch", "--loss-agg", "max-len", "--top-k", "20"],
    "tempo": ["--method", "tempo", "--objective", "gspo", "--epochs", "2", "--no-scale-td"],
    "treeadv": ["--method", "treeadv", "--sampler", "tree", "--unique-segments", "--tree-tau", "0.5"],
    "hepo": ["--method", "hepo", "--kl-coef", "0.05", "--loss-agg", "seq-mean", "--no-grad-ckpt"],
    "fsdp2": ["--method", "tempo", "--fsdp", "--sampler", "tree", "--kl-coef", "0.05"],
}


def _assert_same_metrics(one, two, skip=("update_pad_ratio",)):
    """Per-step metrics of a 1-process and a 2-process run agree to float tolerance (sums over different
    batch shapes round differently). Only how rows pack into micro-batches differs, hence `skip`."""
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(_stable(one), _stable(two)):
        assert a.keys() == b.keys()
        for k in a:
            if k not in skip:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k, a[k], b[k])


@pytest.mark.parametrize("name", list(TORCHRUN))
def test_torchrun_two_processes_gloo_equal_one_process(name, warm_dir, tmp_path):
    """2-process gloo run (DDP, or FSDP2) per method; its per-step metrics (reward, response length, loss,
    grad norm, KL, validation, ...) equal those of the same run in one process: the sampler is keyed by the
    prompt's place in the step and a mini-batch holds the same prompts on any number of ranks."""
    flags = [*_small(tmp_path / "two", warm_dir, "--steps", "2", "--save-every", "2", "--val-every", "2",
                     "--val-limit", "16", "--sample-every", "1"), *TORCHRUN[name]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *flags]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    out = tmp_path / "two"
    rows = train.read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and "val_acc" in rows[0] and "val_acc" in rows[2]
    for r in rows[1:]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["skipped_updates"] == 0
        assert r["decoded_tokens"] > 0 and 0 <= r["branch_token_frac"] <= 1
    assert any(r["adv_abs_mean"] > 0 for r in rows[1:])
    assert len(open(out / "samples.jsonl").read().splitlines()) == 2
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(train.latest_checkpoint(str(out)))
    initial = AutoModelForCausalLM.from_pretrained(warm_dir)
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), initial.state_dict().values())]
    assert any(changed)
    one = [f.replace(str(out), str(tmp_path / "one")) for f in flags if f != "--fsdp"]
    train.train(train.parse_args(one))
    _assert_same_metrics(train.read_metrics(tmp_path / "one"), rows)


GRADS = """
import contextlib
import sys
import torch
import rollout
import train

batch_file, out_file, fsdp, tied = sys.argv[1], sys.argv[2], sys.argv[3] == "fsdp", sys.argv[4] == "tied"
worker = train.setup_distributed("cpu")
args = train.Args(**torch.load(batch_file)["args"], fsdp=fsdp)
tok = rollout.build_tiny_tokenizer()
with train.parameters_on_meta():  # every rank: no weights in memory; rank 0 alone builds them and broadcasts
    model = rollout.build_tiny_model(tok, hidden=64, layers=2)
full = rollout.build_tiny_model(tok, hidden=64, layers=2) if worker.rank == 0 else None
if not tied:
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    if full is not None:
        full.lm_head.weight = torch.nn.Parameter(full.lm_head.weight.detach() * 2)
model = train.place_model(model, worker, args, torch.float32, full and full.state_dict(), load=True, trainable=True)
batch = torch.load(batch_file)["batch"]
rows = [r for p in train.rank_places(worker.rank, worker.world_size, 4, 4) for r in range(2 * p, 2 * p + 2)]  # this rank's groups
mine = {k: v[rows] for k, v in batch.items()}
N = torch.tensor([train.loss_normaliser(mine["response_mask"], mine["weight"], args.loss_agg, args.max_new_tokens)])
N = float(train.all_reduce(N.double()))
train.accumulate_gradients(model, mine, N, args, worker.world_size, contextlib.nullcontext())
whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
named = list(train.unwrap(model).named_parameters())
grads = {n: whole(p.grad).clone() for n, p in named}
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
train.apply_update(model, opt, args.lr, args.grad_clip, True)
params = {n: whole(p.detach()).clone() for n, p in named}
if worker.rank == 0:
    hf = train.unwrap(model)
    torch.save({"grads": grads, "params": params, "tied": hf.lm_head.weight is hf.model.embed_tokens.weight}, out_file)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("mode", ["ddp-tied", "fsdp-tied", "fsdp-untied", "ddp-untied"])
def test_one_rank_and_two_ranks_make_the_same_update(tiny_tokenizer, tmp_path, mode):
    """2 gloo ranks (DDP or FSDP2; LM head tied to the embeddings or not), each with its share of the
    mini-batch and the global normaliser, against one process with all of it: the gradients and the
    parameters after one AdamW step agree to 1e-5. Removing `loss * world` (DDP and FSDP average over
    ranks) halves the gradients and fails this; so does a head whose gradient misses FSDP2's reduction.
    The models are built on the meta device everywhere and filled from rank 0 by broadcast."""
    args = dict(group_size=2, mini_batch_prompts=4, temperature=0.8, lr=1e-3, micro_batch_tokens=20, logit_chunk=7,
                kl_coef=0.05, max_new_tokens=6)
    batch = _random_batch()
    one = rollout.build_tiny_model(tiny_tokenizer, hidden=64, layers=2).train()
    if mode.endswith("untied"):
        one.config.tie_word_embeddings = False
        one.lm_head.weight = torch.nn.Parameter(one.lm_head.weight.detach() * 2)
    lp = train.batch_logprobs(one, batch, train.Args(**args), contextlib.nullcontext())
    g = torch.Generator().manual_seed(2)
    batch["old_logp"] = (lp + 0.2 * torch.randn(lp.shape, generator=g)) * batch["response_mask"]
    batch["ref_logp"] = (lp + 0.2 * torch.randn(lp.shape, generator=g)) * batch["response_mask"]
    torch.save({"batch": batch, "args": args}, tmp_path / "batch.pt")
    script = tmp_path / "grads.py"
    script.write_text(GRADS)
    fsdp, tied = mode.split("-")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "batch.pt"), str(tmp_path / "two.pt"), fsdp, tied],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "two.pt").exists(), res.stdout[-2000:] + res.stderr[-4000:]
    two = torch.load(tmp_path / "two.pt")
    assert two["tied"] == (tied == "tied")
    a = train.Args(**args)
    N = train.loss_normaliser(batch["response_mask"], batch["weight"], a.loss_agg, a.max_new_tokens)
    train.accumulate_gradients(one, batch, N, a, 1, contextlib.nullcontext())
    grads = {n: p.grad.clone() for n, p in one.named_parameters()}
    opt = torch.optim.AdamW(one.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    train.apply_update(one, opt, a.lr, a.grad_clip, True)
    assert grads.keys() == two["grads"].keys() and sum(float(v.abs().sum()) for v in grads.values()) > 0
    for n in grads:
        torch.testing.assert_close(two["grads"][n], grads[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
        torch.testing.assert_close(two["params"][n], dict(one.named_parameters())[n].detach(), atol=1e-5, rtol=1e-5)


RESUME = """
import sys
import train

n, base = int(sys.argv[1]), sys.argv[2:]
for mode in ("ddp", "fsdp"):
    flags = base + (["--fsdp"] if mode == "fsdp" else [])
    out = lambda name: ["--out", f"{OUT}/{mode}-{name}"]  # noqa: E731
    train.train(train.parse_args(flags + out("straight") + ["--steps", str(2 * n)]))
    train.train(train.parse_args(flags + out("resumed") + ["--steps", str(n)]))
    train.train(train.parse_args(flags + out("resumed") + ["--steps", str(2 * n), "--resume"]))
"""


def torchrun_straight_and_resumed(tmp_path, flags: list[str], n: int, timeout: int) -> None:
    """Under torchrun (2 gloo ranks), DDP then FSDP2: 2n steps straight into TMP/{ddp,fsdp}-straight, and n steps
    then --resume to 2n into TMP/{ddp,fsdp}-resumed. `flags` must not hold --out or --steps."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME.replace("{OUT}", str(tmp_path)))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(n), *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def test_torchrun_resume_continues_exactly_ddp_and_fsdp2(warm_dir, tmp_path):
    """N + N steps == 2N straight under torchrun, DDP and FSDP2: metrics, exported weights and the sharded
    model and optimizer state, bit for bit; and the export loads as --model (one process, no FSDP)."""
    flags = _small(tmp_path / "unused", warm_dir, "--epochs", "2", "--save-every", "2", "--method", "tempo",
                   "--max-new-tokens", "4", "--kl-coef", "0.05")
    flags = flags[:flags.index("--out")] + flags[flags.index("--out") + 2:]
    torchrun_straight_and_resumed(tmp_path, flags, 2, timeout=600)
    for mode in ("ddp", "fsdp"):
        a, b = train.read_metrics(tmp_path / f"{mode}-straight"), train.read_metrics(tmp_path / f"{mode}-resumed")
        assert [r["step"] for r in b] == [1, 2, 3, 4] and _stable(a) == _stable(b)
        assert any(r["grad_norm"] > 0 for r in a)
        ckpts = [train.latest_checkpoint(str(tmp_path / f"{mode}-{x}")) for x in ("straight", "resumed")]
        _assert_same_checkpoint(*ckpts, tmp_path)
    ddp = train.read_metrics(tmp_path / "ddp-straight")
    _assert_same_metrics(ddp, train.read_metrics(tmp_path / "fsdp-straight"))
    ckpt = train.latest_checkpoint(str(tmp_path / "fsdp-straight"))
    train.train(train.parse_args(_small(tmp_path / "again", ckpt, "--steps", "1", "--save-every", "0")))


UNEVEN = """
import sys
import torch
import torch.distributed as dist
import rollout
import train

worker = train.setup_distributed("cpu")
m = train.wrap_model(rollout.build_tiny_model(rollout.build_tiny_tokenizer()), worker, True, torch.float32)
with train.sampling_mode(m) as policy, torch.no_grad():
    for _ in range(1 + 3 * worker.rank):  # rank 0 one forward call, rank 1 four: rows finishing at different times
        policy(input_ids=torch.tensor([[3, 4, 5]]))
m(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()  # FSDP's collectives must still line up
dist.barrier()
print("uneven forwards ok", flush=True)
dist.destroy_process_group()
"""


def test_fsdp_sampling_survives_uneven_forward_counts(tmp_path):
    """Without sampling_mode's unshard, FSDP2 all-gathers in every forward and this aborts (checked by hand)."""
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    # Both ranks got past the uneven forwards and the backward. Not the exit code: under heavy CPU load the
    # process teardown after destroy_process_group occasionally aborts ("terminate called without an active
    # exception"), after both ranks have printed; that is gloo/FSDP shutdown, not what this test is about.
    assert res.stdout.count("uneven forwards ok") == 2, res.stdout[-2000:] + res.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# The demo learns at a fixed seed; with shuffled rewards it does not


def test_warm_start_checks_accuracy_on_whole_answers(tiny_tokenizer, monkeypatch):
    """The target check gives the longest answer room: with a 16-token cut (the bug), chain's solutions
    (up to 32 tokens) were scored wrong, the 0.3 target was never met and every warm step ran."""
    import evaluate
    seen = []

    def fake_evaluate(model, tokenizer, task, examples, *, max_new_tokens, **kw):
        seen.append(max_new_tokens)
        return {"accuracy": 1.0}, []

    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    examples = evaluate.load_examples("chain", "train", limit=200)
    model = rollout.build_tiny_model(tiny_tokenizer, hidden=32, layers=1)
    done, _, acc = train.supervised_warm_start(model, tiny_tokenizer, "chain", examples, steps=5, batch_size=4,
                                               lr=1e-3, target=0.3, check_every=2, check_examples=examples[:8])
    longest = max(len(tiny_tokenizer.encode(ex["solution"], add_special_tokens=False)) + 1 for ex in examples)
    assert (done, acc) == (2, 1.0) and seen == [longest] and longest > 16


@pytest.mark.slow
def test_demo_learns_and_shuffled_rewards_do_not(warm_dir, tmp_path):
    common = ["--demo", "--warm-dir", warm_dir, "--no-progress", "--sample-every", "0", "--save-every", "0"]
    real = train.demo(train.parse_args([*common, "--val-every", "200", "--out", str(tmp_path / "grpo")]))
    # the control needs fewer steps: with rewards detached from responses accuracy only falls
    control = train.demo(train.parse_args([*common, "--steps", "50", "--val-every", "50", "--shuffle-rewards",
                                           "--out", str(tmp_path / "shuffled")]))
    assert real["before"] == control["before"]  # the same warm start
    assert real["after"] - real["before"] >= 0.1, real
    assert control["after"] - control["before"] < 0.05, control
    assert os.path.getsize(tmp_path / "grpo" / "plot.png") > 10_000
