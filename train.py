"""train.py: the GRPO / TEMPO / TreeAdv / HEPO / PPO training loop on Qwen3 (torchrun; DDP or FSDP2), and the demo.

What it implements (README's SPEC sections):
- SPEC 6, the one policy loss of every method: PPO-clip (eps 0.2 / 0.28, dual clip 3) on log-probs of
  logits / temperature; token mean over the whole step (or the sequence mean of token means, or Dr. GRPO's
  divide-by-max-length) that does not depend on world size or micro-batch size; optional k3 KL to a
  frozen reference; AdamW with gradient clipping.
- SPEC 5, TreeAdv's objectives: the token ratio, or the GSPO-token ratio (`--objective gspo`), over
  flattened leaf paths or unique segments (`--unique-segments`); `--gspo-paper` gives GSPO as published.
- SPEC 9, PPO with a learned critic (`--method ppo`): the policy's backbone with a value head, its own
  AdamW and clipped value loss, GAE from its values, advantages whitened over the step.
- SPEC 7, the paper's setup as the defaults (Qwen3-1.7B, MATH, G = 7, 256 prompts a step in 64-prompt
  mini-batches, 2,048 new tokens, lr 1e-6).
Advantages come from advantages.py, rollouts from rollout.py, rewards and validation from evaluate.py.
The file reads as the algorithm does: the loss, the log-probs it needs, one update, one RL step
(rollout -> reward -> advantages -> update -> log -> validate / checkpoint) and the loop; the
infrastructure (arguments, distributed plumbing, model loading, checkpoints, logs, demo) comes after it.
README "How train.py runs at scale" says how ranks share the work, why the weights stay fp32, how
log-probs are computed without [B, T, V] logits, how micro-batches are planned and what a checkpoint holds.

Departures: dual clip also applies to the GSPO-token ratio in the shared loss (SPEC 6); warmup counts
RL steps; `--shuffle-rewards` (a control, not in the papers) permutes the rewards over the step's rows.

Run:
    python train.py --demo                                   # offline CPU demo: warm start, then RL (minutes)
    torchrun --nproc_per_node 8 train.py --method tempo      # the paper's setup (downloads Qwen3-1.7B, MATH)
    torchrun --nproc_per_node 2 train.py --device cpu --model tiny --task add --steps 2 --prompts-per-step 4 \\
        --mini-batch-prompts 4 --max-new-tokens 8 --out runs/cpu-ddp --overwrite   # gloo on CPU (--fsdp: FSDP2)
    python benchmarks/bench_step.py                          # one step's time split and tokens/s
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

import advantages
import evaluate
import rollout

METHODS = ("grpo", "tempo", "treeadv", "hepo", "ppo", "treeadv-centred", "treerl", "treepo", "spo")
OBJECTIVES = ("grpo", "gspo")
LOSS_AGGS = ("token-mean", "seq-mean", "max-len")
RECOMPUTE = ("auto", "always", "never")


class UserError(ValueError):
    """A problem with the flags, the data files or the run directory: `train.py: error: ...` on one line, exit 2."""


class StopRun(RuntimeError):
    """The run cannot go on (non-finite weights, a hung or lost rank, steps that keep failing): one line, exit 1.
    Nothing of the bad state is saved: the last complete checkpoint stands."""


# ==============================================================================================
# 1. The knobs: one dataclass, every field one option (checked by `check_args`, at the bottom)


@dataclass
class Args:
    # --- the algorithm
    method: str = "grpo"
    """advantage: grpo (SPEC 1) | tempo (SPEC 3) | treeadv (SPEC 5) | hepo (SPEC 4) | ppo (SPEC 9, a critic)"""
    scale: str = "group"
    """advantage scaling: group std | batch std | none (= Dr. GRPO)"""
    td_weight: float = 1.0
    """tempo: weight of the TD term (1.0 = the paper)"""
    scale_td: bool = True
    """tempo: divide the TD term by sigma, as the paper does (SPEC 8 offers the unscaled form)"""
    hepo_rho: float = 0.2
    """hepo: fraction of the batch's highest-entropy tokens that keep their advantage"""
    unique_segments: bool = False
    """treeadv: weight each token 1/n(s), training every shared segment once (SPEC 5b)"""
    objective: str = "grpo"
    """policy ratio: grpo (token ratio) | gspo (GSPO-token ratio, inside the shared loss of SPEC 6)"""
    gspo_paper: bool = False
    """GSPO as published: --objective gspo --loss-agg seq-mean --clip-low 3e-4 --clip-high 4e-4 --dual-clip 0"""
    loss_agg: str = "token-mean"
    """loss aggregation: token-mean over the step | seq-mean (mean of token means) | max-len (sum / rows x max_new)"""
    clip_low: float = 0.2
    """PPO clip: ratio >= 1 - clip_low"""
    clip_high: float = 0.28
    """PPO clip: ratio <= 1 + clip_high"""
    dual_clip: float = 3.0
    """dual-clip constant c > 1 bounding the loss of negative advantages (0 = off)"""
    kl_coef: float = 0.0
    """k3 KL to the frozen initial model, added per token (0 = off, the paper)"""
    epochs: int = 1
    """policy epochs per rollout batch (old log-probs stored); the critic takes as many"""
    critic_lr: float = 1e-5
    """ppo: the critic's AdamW learning rate (SPEC 9: 1e-5, verl's default), constant"""
    gamma: float = 1.0
    """ppo: GAE discount (SPEC 9: 1.0, verl's default)"""
    lam: float = 1.0
    """ppo: GAE lambda (SPEC 9: 1.0, verl's default)"""
    value_clip: float = 0.5
    """ppo: the value loss clips V to V_old +- this (SPEC 9: 0.5)"""
    # --- model and data
    model: str = "Qwen/Qwen3-1.7B"
    """hub id, local directory (a checkpoint of this script included), or `tiny` (random, offline)"""
    tiny_hidden: int = 64
    """tiny model: hidden size"""
    tiny_layers: int = 2
    """tiny model: decoder layers"""
    task: str = "math"
    """evaluate.BENCHES name to train and validate on (add, chain: offline synthetic)"""
    data: str | None = None
    """local training file (json, jsonl, parquet) in the task's schema, instead of the hub"""
    val_data: str | None = None
    """local validation file in the task's schema, instead of the hub's test split"""
    train_limit: int | None = 1000
    """training prompts (SPEC 7: 1,000 drawn at random; None = all)"""
    val_limit: int | None = 100
    """validation prompts (SPEC 7: 100)"""
    thinking: bool = False
    """Qwen3 thinking mode in the chat template"""
    max_prompt_tokens: int = 1024
    """prompts longer than this are dropped (SPEC 7: 1,024)"""
    # --- batch
    group_size: int = 7
    """G responses per prompt"""
    prompts_per_step: int = 256
    """prompts per step over all ranks (SPEC 7: 256)"""
    mini_batch_prompts: int = 64
    """prompts per optimizer update (SPEC 7: 64, i.e. 4 updates per epoch)"""
    micro_batch_tokens: int = 16384
    """most positions (rows x longest row) per forward/backward on a rank; rows sorted by length (longer rows alone)"""
    micro_batch_rows: int = 64
    """most rows per forward/backward on a rank (gradient accumulation; neither limit changes the result)"""
    # --- sampling
    max_new_tokens: int = 2048
    """response budget in tokens (SPEC 7: 2,048)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are of logits / temperature"""
    top_p: float = 1.0
    """nucleus sampling (1.0 = off, the paper)"""
    top_k: int = 0
    """top-k sampling (0 = off, the paper)"""
    sampler: str = "flat"
    """flat (G independent responses) | tree (TreeAdv's entropy-forked forest)"""
    tree_tau: float | None = None
    """tree sampler: entropy threshold in nats (None: rollout.SamplingConfig's default)"""
    tree_chains: int | None = None
    """tree sampler: root chains per prompt (None: rollout's default)"""
    tree_children: int | None = None
    """tree sampler: children per fork (None: rollout's default)"""
    tree_forks: int | None = None
    """tree sampler: most forks per prompt (None: rollout's default)"""
    recompute_logprobs: str = "auto"
    """old log-probs: auto (recomputed under bf16 compute or top-p/top-k, else the sampler's) | always | never"""
    kv_budget: int | None = None
    """most KV-cache token positions while sampling (None: from free GPU memory on CUDA, unbounded on CPU)"""
    page_size: int = rollout.SamplingConfig.page_size
    """KV-cache positions per page while sampling (rollout.SamplingConfig.page_size)"""
    compile_decode: bool = False
    """run the sampler's decode step under torch.compile (CUDA graphs on GPU)"""
    # --- optimisation
    lr: float = 1e-6
    """AdamW learning rate (SPEC 6: 1e-6, constant)"""
    warmup_steps: int = 0
    """linear lr warmup over this many RL steps"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient-norm clipping (0 = off)"""
    steps: int = 45
    """RL steps (SPEC 7: 15 passes over 1,000 prompts at 256 a step, drop-last)"""
    max_nonfinite: int = 3
    """stop after this many steps in a row with a non-finite loss or gradient (those updates are skipped)"""
    # --- system
    device: str = "auto"
    """auto (this rank's GPU if any) | cpu | cuda"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32; parameters stay fp32"""
    fsdp: bool = False
    """shard with FSDP2 fully_shard instead of DDP"""
    grad_ckpt: bool = True
    """gradient checkpointing in the update (never while sampling)"""
    logit_chunk: int = 1024
    """token positions whose logits exist at a time in the update's log-probs (forward and backward)"""
    dist_timeout: float = 60.0
    """process-group timeout in minutes: ranks wait this long for the slowest one's rollout or checkpoint"""
    seed: int = 0
    """seed of data order, sampling and the tiny model"""
    # --- output
    out: str | None = None
    """run directory: metrics.jsonl, samples.jsonl, config.json, checkpoints, plot (default runs/METHOD-TASK)"""
    resume: bool = False
    """continue from OUT's newest complete checkpoint (a fresh start if OUT holds no run; never deletes anything)"""
    resume_override: bool = False
    """--resume even where the flags differ from OUT/config.json (beyond RESUME_FREE); the changes are recorded"""
    overwrite: bool = False
    """allow an OUT that already holds a run (its files are replaced)"""
    val_every: int = 5
    """validate before the first step, every N steps and after the last (0 = never)"""
    val_batch_size: int = 64
    """prompts per validation generation batch"""
    save_every: int = 10
    """checkpoint every N steps, after the last step and on SIGTERM/Ctrl-C (0 = never)"""
    keep_last: int = 1
    """checkpoints kept"""
    sample_every: int = 5
    """write one group's completions to samples.jsonl every N steps (0 = never)"""
    progress: bool = True
    """progress bar on rank 0"""
    # --- controls, demo, benchmark
    shuffle_rewards: bool = False
    """control: permute the rewards over the step's rows, so there is nothing to learn"""
    demo: bool = False
    """the offline demo: tiny Qwen3, supervised warm start on `add`, then RL with --method"""
    warm_steps: int = 2000
    """demo: most supervised warm-start steps"""
    warm_target: float = 0.3
    """demo: the warm start stops once greedy accuracy on 200 training prompts reaches this (checked every 50 steps)"""
    warm_batch: int = 64
    """demo: warm-start batch size"""
    warm_lr: float = 1e-3
    """demo: warm-start learning rate"""
    warm_dir: str | None = None
    """demo: where the warm-started model is cached (default OUT/warm-start)"""


# ==============================================================================================
# 2. The policy loss (SPEC 6, and SPEC 5's GSPO-token ratio): small pure functions on [B, T] tensors.
#    Padding positions may hold any number (a pad token's log-prob can be -1e4): every function masks
#    before an exponential, so nothing non-finite is ever made there.

# k3's bounds, verl's (`kl_penalty`, low_var_kl): the log-ratio log pi_ref - log pi is clamped to +-20 and
# the per-token k3 to at most 10. Why: one token the policy has made nearly impossible under the
# reference (pi_ref / pi = e^20) would otherwise add e^20 to the loss and a gradient of the same size,
# which gradient clipping turns into a step that ignores every other token. A token beyond a bound
# passes no KL gradient, as a clipped ratio passes no policy gradient.
KL_LOG_RATIO_BOUND = 20.0
KL_BOUND = 10.0


def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                 objective: str = "grpo") -> torch.Tensor:
    """The importance ratio per token, [B, T] (1 at padding).

    grpo: r_{i,t} = exp(log pi(o_t) - log pi_old(o_t)).
    gspo (GSPO-token): s_{i,t} = sg[s_i] * pi(o_t) / sg[pi(o_t)], s_i = exp(mean_t (log pi - log pi_old)) over
    row i's valid tokens; its value is s_i at every token, its gradient s_i * grad log pi(o_t).

    Unique segments (weights 1/n(s), SPEC 5b): the n copies of a shared tree token have the same context,
    so under the token ratio they have the same ratio and gradient, and n copies weighted 1/n train the
    segment once. Under the GSPO-token ratio they do not: each copy carries its own row's s_i (and is
    clipped by it), so the weighted copies train the segment once with the average of the rows' ratios.
    """
    mask = mask.bool()
    log_r = torch.where(mask, logp - old_logp, 0.0)  # [B, T]
    if objective == "grpo":
        return torch.exp(log_r)
    log_s = log_r.sum(-1) / mask.sum(-1).clamp(min=1)  # [B] log s_i
    return torch.exp(log_s.detach()[:, None] + torch.where(mask, logp - logp.detach(), 0.0))


def ppo_clip_loss(ratio: torch.Tensor, A: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28,
                  dual_clip: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); for A < 0 (dual clip, c > 1)
    l = min(l, -c A), which bounds the loss when r >> 1. Returns (l, clipped, dual_clipped), [B, T] each;
    `clipped` marks tokens where the clipped term was chosen (no gradient), `dual_clipped` where -c A was.
    """
    unclipped = -A * ratio
    clipped = -A * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual = torch.zeros_like(is_clipped)
    if dual_clip:
        is_dual = (A < 0) & (loss > -dual_clip * A)
        loss = torch.where(is_dual, -dual_clip * A, loss)
    return loss, is_clipped, is_dual


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 >= 0 with d = log pi_ref - log pi,
    0 where `mask` is False (masked before the exponential), d clamped to +-KL_LOG_RATIO_BOUND and the
    result to at most KL_BOUND (verl's bounds; see there for why)."""
    d = ref_logp - logp
    if mask is not None:
        d = torch.where(mask.bool(), d, 0.0)
    d = d.clamp(-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    return (torch.exp(d) - d - 1).clamp(max=KL_BOUND)


def loss_normaliser(mask: torch.Tensor, weight: torch.Tensor, agg: str, max_len: int) -> float:
    """This rank's share of the normaliser; all-reduced (summed) over ranks before `aggregate`.

    token-mean: sum of token weights over valid tokens (their count when weights are 1; the number of
    distinct tree tokens with unique segments); seq-mean: rows; max-len: rows * max_new_tokens.
    """
    if agg == "token-mean":
        return float(torch.where(mask.bool(), weight, 0.0).sum())
    rows = float(mask.shape[0])
    return rows if agg == "seq-mean" else rows * max_len


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, agg: str,
              normaliser: float) -> torch.Tensor:
    """This micro-batch's part of the step loss: its sum divided by the global normaliser N.

    token-mean and max-len: sum_{i,t} w l / N. seq-mean: sum_i (sum_t w l / |o_i|) / N, N = rows (the
    sequence mean of token means: GSPO's and verl's seq-mean-token-mean). Summed over micro-batches and
    ranks this is the loss of the whole mini-batch, whatever the split.
    """
    mask = mask.bool()
    wl = torch.where(mask, per_token * weight, 0.0)
    if agg == "seq-mean":
        return (wl.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    return wl.sum() / normaliser


def policy_loss(logp, old_logp, A, mask, weight, normaliser: float, *, objective: str = "grpo",
                clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float = 3.0, agg: str = "token-mean",
                kl_coef: float = 0.0, ref_logp=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SPEC 6 loss of one micro-batch ([b, T] inputs), and statistics over its valid tokens for the log:
    sums (tokens, clipped, dual_clipped, approx_kl = k3 to the old policy, kl_ref, old_logp_diff =
    |log pi - log pi_old|) and old_logp_diff_max."""
    mask = mask.bool()
    m = mask.float()
    ratio = policy_ratio(logp, old_logp, mask, objective)
    per_token, is_clipped, is_dual = ppo_clip_loss(ratio, A, clip_low, clip_high, dual_clip)
    diff = torch.where(mask, (logp.detach() - old_logp).abs(), 0.0)
    stats = dict(tokens=m.sum(), clipped=(is_clipped * m).sum(), dual_clipped=(is_dual * m).sum(),
                 approx_kl=k3_kl(logp.detach(), old_logp, mask).sum(),
                 old_logp_diff=diff.sum(), old_logp_diff_max=diff.max())
    if kl_coef > 0:
        kl = k3_kl(logp, ref_logp, mask)
        per_token = per_token + kl_coef * kl
        stats["kl_ref"] = kl.detach().sum()
    return aggregate(per_token, mask, weight, agg, normaliser), stats


# ==============================================================================================
# 3. Log-probs from the final hidden states: the LM head in token chunks, recomputed in the backward


class _HeadLogProb(torch.autograd.Function):
    """lp = log softmax(h W^T / temperature)[y] for N token positions, `chunk` positions at a time.

    Forward: per chunk z = h W^T in the compute dtype (the LM head's own rounding), upcast to fp32,
    lp = z_y / T - logsumexp(z / T). Only h and W are saved, never logits. Backward: z is recomputed per
    chunk; dz = g (onehot(y) - softmax(z / T)) / T; dh = dz W, dW = sum over chunks of dz^T h, summed in
    fp32. Peak: a few [chunk, V] tensors and one [V, H] fp32 sum, whatever N is.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, dtype):
        N = hidden.shape[0]
        lp = torch.empty(N, dtype=torch.float32, device=hidden.device)  # [N]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # [V, H]
            for s in range(0, N, chunk):
                z = (hidden[s:s + chunk].to(dtype) @ w.t()).float().div_(temperature)  # [n, V] fp32, n <= chunk
                lp[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - z.logsumexp(1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return lp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        T, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None  # [V, H] fp32 sum over chunks
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(dtype)  # [n, H]
                g = grad[s:s + chunk, None].float()  # [n, 1]
                dz = torch.softmax((h @ w.t()).float().div_(T), 1).mul_(-g)  # [n, V]
                dz.scatter_add_(1, targets[s:s + chunk, None], g)
                dz = dz.div_(T).to(dtype)
                if grad_h is not None:
                    grad_h[s:s + chunk] = dz @ w
                if grad_w is not None:
                    grad_w += dz.t() @ h  # a [V, H] product in the compute dtype, summed in fp32
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  chunk: int = 1024) -> torch.Tensor:
    """log pi(y | s) = log_softmax(h W^T / temperature)[y], float32 [N], for final hidden states h [N, H],
    an LM head's weight W [V, H] (no bias) and targets y [N].

    The logits are computed in the dtype the LM head would use: autocast's when it is on (bf16 under
    DDP on GPU), else the weight's (bf16 under FSDP2's mixed precision, fp32 on CPU). Equal to
    `log_softmax(F.linear(h, W).float() / T).gather(-1, y)` in value and gradient (the tests check both).
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return _HeadLogProb.apply(hidden, weight, targets, float(temperature), int(chunk), dtype)


@contextlib.contextmanager
def head_replaced(model, fn):
    """Inside the block the model's output head computes fn(hidden_states, head) instead of logits, and the
    model's forward returns that as `.logits`.

    Why replace the head rather than call the backbone and then the head: the root module's forward
    stays the one that runs, with every hook around it. Under FSDP2 the root's fully_shard owns the
    embeddings, the final norm and the LM head (tied to the embeddings in Qwen3-0.6B/1.7B); its
    pre-forward hook unshards them and its backward hooks reduce their gradients. A forward through the
    backbone submodule would skip those hooks; here fn runs inside the root's forward and sees the
    head's parameters unsharded. Works the same under DDP and in one process, tied head or not.
    A critic can reuse it with a value head's fn.
    """
    head = unwrap(model).get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(unwrap(model).config, "final_logit_softcapping", None):
        raise NotImplementedError("head_logprobs assumes logits = h W^T (Qwen3's head: no bias, no soft-capping)")
    head.forward = lambda hidden: fn(hidden, head)
    try:
        yield
    finally:
        del head.forward  # the class's forward again


# ==============================================================================================
# 4. Micro-batches by a token budget, and the forward passes over (prompt, response) rows


def row_lengths(batch: dict) -> list[int]:
    """Positions a row needs in the forward: its prompt and response tokens but the last (which predicts nothing)."""
    return (batch["prompt_mask"].sum(1) + batch["response_mask"].sum(1).clamp(min=1) - 1).tolist()


def plan_micro_batches(lengths: list[int], max_tokens: int, max_rows: int, max_padding: float = 0.1) -> list[list[int]]:
    """Row indices of each micro-batch: rows sorted by length (longest first, so a budget too large for the
    memory fails on the first micro-batch), cut into runs of <= max_rows rows with rows x longest <= max_tokens
    (a row longer than max_tokens runs alone), padding (sum of rows x longest, less the real positions, the
    sum of lengths) <= max_padding x max(real positions, max_tokens), and as few micro-batches as that
    allows. Deterministic. So a mini-batch of more than max_tokens real positions is padded by at most
    max_padding of them, and a smaller one may pad up to max_padding of a budget rather than run as more
    forwards (a forward has a fixed cost: every layer's weights are read, and gathered under FSDP).

    Why not pack greedily while the budget allows: the first row of a micro-batch sets its width, so a long
    row followed by shorter ones pads them all (benchmarks/bench_update.py prints both).
    How: for a price c per micro-batch, `_cheapest_cuts` finds the cuts minimising positions + c x
    micro-batches; c = 0 pads nothing, a larger c buys fewer micro-batches with padding. Bisection finds the
    largest c whose plan keeps the bound (positions do not decrease as c grows)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    bound = sum(sorted_lengths) + max_padding * max(sum(sorted_lengths), max_tokens)  # most positions allowed
    def cuts(price):
        return _cheapest_cuts(sorted_lengths, max_tokens, max_rows, price)

    lo, hi = 0, sum(sorted_lengths) + 1  # price 0 pads nothing; at hi one micro-batch outweighs all padding
    if _positions(sorted_lengths, cuts(hi)) <= bound:
        lo = hi
    while hi - lo > 1:  # invariant: price lo keeps the bound, price hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _positions(sorted_lengths, cuts(mid)) <= bound else (lo, mid)
    ends = cuts(lo)
    return [order[s:e] for s, e in zip([0] + ends[:-1], ends)]


def _cheapest_cuts(lengths: list[int], max_tokens: int, max_rows: int, price: int) -> list[int]:
    """End index of each run of the (sorted, longest first) lengths that minimises sum of rows x longest +
    price per run, under the row and token limits: a dynamic programme from the end, O(n x max_rows).
    Ties go to fewer positions, then to the longer first run."""
    n = len(lengths)
    cost, end = [(0, 0)] * (n + 1), [n] * (n + 1)  # cost[i]: (positions + price x runs, positions) of rows i..n-1
    for i in range(n - 1, -1, -1):
        cost[i] = (math.inf, math.inf)
        for j in range(i + 1, min(n, i + max_rows) + 1):
            k = j - i
            if k > 1 and k * lengths[i] > max_tokens:
                break
            c = (k * lengths[i] + price + cost[j][0], k * lengths[i] + cost[j][1])
            if c <= cost[i]:
                cost[i], end[i] = c, j
    cuts, i = [], 0
    while i < n:
        i = end[i]
        cuts.append(i)
    return cuts


def _positions(lengths: list[int], cuts: list[int]) -> int:
    """Padded positions of the runs ending at `cuts` over lengths sorted longest first."""
    return sum((e - s) * lengths[s] for s, e in zip([0] + cuts[:-1], cuts))


def pack_rows(batch: dict, rows: list[int]) -> dict:
    """The rows of `batch` as one forward's input: each row its prompt then its response with no padding
    between (prompt_ids are left-padded, response_ids right-padded), right-padded to the longest; and the
    per-token tensors ([b, T] response-aligned: response_ids, response_mask, A, ...) cut to the longest
    response. `head_index`: the flat [n * L] position of the hidden state that predicts each valid
    response token (position plen - 1 + t predicts token t), in response_mask's row-major order."""
    idx = torch.tensor(rows, device=batch["response_mask"].device)
    pm, rm = batch["prompt_mask"][idx], batch["response_mask"][idx]
    plen, rlen = pm.sum(1), rm.sum(1)  # [n]
    Tp, Tr = pm.shape[1], rm.shape[1]
    T, L = max(int(rlen.max()), 1), max(int((plen + rlen.clamp(min=1) - 1).max()), 1)
    j = torch.arange(L, device=idx.device)[None]  # [1, L]
    prompt_part = batch["prompt_ids"][idx].gather(1, (Tp - plen[:, None] + j).clamp(max=Tp - 1))  # [n, L]
    response_part = batch["response_ids"][idx].gather(1, (j - plen[:, None]).clamp(0, Tr - 1))  # [n, L]
    attn = j < (plen + rlen.clamp(min=1) - 1)[:, None]  # [n, L] bool
    ids = torch.where(j < plen[:, None], prompt_part, response_part).masked_fill(~attn, 0)
    out = {k: v[idx][:, :T] for k, v in batch.items() if not k.startswith("prompt")}
    t = torch.arange(T, device=idx.device)[None]  # [1, T]
    flat = torch.arange(len(rows), device=idx.device)[:, None] * L + plen[:, None] - 1 + t  # [n, T]
    out.update(input_ids=ids, attention_mask=attn.long(), position_ids=j.expand(len(rows), L),
               head_index=flat[out["response_mask"]])
    return out


def micro_batches(batch: dict, args: Args) -> list[list[int]]:
    """This rank's micro-batches (`plan_micro_batches`), as many on every rank. Why: under FSDP2 every forward
    gathers each layer's weights from all ranks, so a rank that ran fewer forwards would leave the others
    waiting in a collective forever. Ranks hold the same number of rows, so splitting the micro-batch with the
    most rows in two until the counts agree always works, and the gradient (a sum) does not change."""
    plan = plan_micro_batches(row_lengths(batch), args.micro_batch_tokens, args.micro_batch_rows)
    n = torch.tensor([float(len(plan))], device=batch["response_mask"].device)
    n = int(all_reduce(n, dist.ReduceOp.MAX).item())
    while len(plan) < n:
        k = max(range(len(plan)), key=lambda i: len(plan[i]))
        rows = plan.pop(k)
        if len(rows) < 2:
            raise RuntimeError(f"micro_batches: {n} micro-batches on some rank, only {len(plan) + 1} rows here")
        plan[k:k] = [rows[:len(rows) // 2], rows[len(rows) // 2:]]
    return plan


def response_logprobs(model, mb: dict, temperature: float, chunk: int, ctx) -> torch.Tensor:
    """log pi(o_t | q, o_<t) at every response position of a packed micro-batch (`pack_rows`), [b, T]
    float32, 0 at padding. The LM head runs on the valid response tokens only (`head_replaced`)."""
    mask = mb["response_mask"]
    targets = mb["response_ids"][mask]  # [N] valid response tokens, row-major

    def logprobs(hidden, head):  # hidden [b, L, H] -> [N]
        return head_logprobs(hidden.flatten(0, 1)[mb["head_index"]], head.weight, targets, temperature, chunk)

    with ctx, head_replaced(model, logprobs):
        lp = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"],
                   use_cache=False).logits  # [N]
    return torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)


@torch.no_grad()
def batch_logprobs(model, batch: dict, args: Args, ctx) -> torch.Tensor:
    """No-grad log-probs of every row ([B, T], 0 at padding): old log-probs when recomputed, reference log-probs."""
    out = torch.zeros(batch["response_mask"].shape, device=batch["response_mask"].device)
    for rows in micro_batches(batch, args):
        mb = pack_rows(batch, rows)
        lp = response_logprobs(model, mb, args.temperature, args.logit_chunk, ctx)
        out[torch.tensor(rows, device=out.device)[:, None], torch.arange(lp.shape[1], device=out.device)] = lp
    return out


# ==============================================================================================
# 5. One update: gradient accumulation over micro-batches, one optimizer step per mini-batch


def accumulate_gradients(model, batch: dict, normaliser: float, args: Args, world: int, ctx) -> dict[str, float]:
    """Forward and backward over a rank's mini-batch in token-budget micro-batches (`plan_micro_batches`).

    Each micro-batch's loss is already its share of the global mini-batch loss (the normaliser is
    global), so gradients must be summed over micro-batches and ranks. Accumulation sums; DDP and
    FSDP average over ranks, hence the factor `world`. Returns the `policy_loss` statistics summed
    (maxima for *_max) and the forward's positions and real (prompt + response) tokens.
    """
    plans = micro_batches(batch, args)
    sums: dict[str, float] = {}
    for k, rows in enumerate(plans):
        mb = pack_rows(batch, rows)
        with grad_sync(model, enabled=k == len(plans) - 1):
            logp = response_logprobs(model, mb, args.temperature, args.logit_chunk, ctx)
            loss, stats = policy_loss(
                logp, mb["old_logp"], mb["A"], mb["response_mask"], mb["weight"], normaliser,
                objective=args.objective, clip_low=args.clip_low, clip_high=args.clip_high, dual_clip=args.dual_clip,
                agg=args.loss_agg, kl_coef=args.kl_coef, ref_logp=mb.get("ref_logp"))
            (loss * world).backward()
        stats.update(loss=loss.detach(), positions=mb["input_ids"].numel(), real_positions=mb["attention_mask"].sum())
        for key, v in stats.items():
            v = float(v)
            sums[key] = max(sums.get(key, v), v) if key.endswith("_max") else sums.get(key, 0.0) + v
    return sums


def apply_update(model, optimizer, lr: float, grad_clip: float, loss_finite: bool) -> tuple[float, bool]:
    """Clip, then step, unless the loss or the gradient norm is not finite on some rank: then skip.
    Returns (grad norm before clipping, skipped). The gradients are cleared either way."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    ok = torch.tensor([float(loss_finite and bool(torch.isfinite(norm)))], device=norm.device)
    ok = bool(all_reduce(ok, dist.ReduceOp.MIN).item())
    if ok:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        check_weights_finite(model)
    optimizer.zero_grad(set_to_none=True)
    return float(norm), not ok


def check_weights_finite(model) -> None:
    """StopRun if a weight is inf or NaN on any rank (each checks its own shards under FSDP2). A step from
    finite gradients can still overflow (a huge --lr); such weights would be saved, then every later step
    and every resume from them fails. The run stops here, before any checkpoint of this state."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in params]).float().min().reshape(1)  # [1]
    if not all_reduce(finite, dist.ReduceOp.MIN).item():
        raise StopRun(f"step {PHASE['step']}: the optimizer step made weights inf or NaN (is --lr too high?); "
                      "stopping without saving them: the last complete checkpoint stands")


def lr_at(step: int, args: Args) -> float:
    """Constant lr after a linear warmup over `warmup_steps` RL steps (step counts from 0)."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


def update_policy(model, optimizer, batch: dict, args: Args, world: int, lr: float, make_ctx) -> dict:
    """--epochs passes over a rank's rows, one optimizer step per mini-batch (mini_batch_prompts over all
    ranks). Every epoch's ratio uses the old log-probs stored in `batch`, never the current policy's.

    Returns {"sums": statistics summed over every micro-batch, "first": the first mini-batch's (taken
    before any step, so its log-probs are the update's recomputation of the old ones), "grad_norms",
    "skipped", "updates"}. `make_ctx` makes a fresh autocast context per use.
    """
    rows = args.mini_batch_prompts // world * args.group_size
    B = batch["A"].shape[0]
    sums: dict[str, float] = {}
    first, norms, skipped = None, [], 0
    for _ in range(args.epochs):
        for s in range(0, B, rows):
            mb = {k: v[s:s + rows] for k, v in batch.items()}
            N = torch.tensor([loss_normaliser(mb["response_mask"], mb["weight"], args.loss_agg, args.max_new_tokens)],
                             dtype=torch.float64, device=mb["A"].device)
            N = max(float(all_reduce(N)), 1e-12)
            part = accumulate_gradients(model, mb, N, args, world, make_ctx())
            first = first or part
            norm, was_skipped = apply_update(model, optimizer, lr, args.grad_clip, math.isfinite(part["loss"]))
            norms.append(norm)
            skipped += was_skipped
            for k, v in part.items():
                sums[k] = max(sums.get(k, v), v) if k.endswith("_max") else sums.get(k, 0.0) + v
    return {"sums": sums, "first": first, "grad_norms": norms, "skipped": skipped, "updates": len(norms)}


# ==============================================================================================
# 5b. The critic of --method ppo (SPEC 9): the policy's backbone with a scalar value head, its own AdamW


def value_loss(values, old_values, returns, mask, normaliser: float,
               clip: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPEC 9's clipped value loss of one micro-batch ([b, T] inputs), as its share of the step's token mean:
    l = 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), summed over valid tokens / the global
    normaliser. Statistics (sums over valid tokens): tokens, clipped (where the clipped term was chosen)."""
    mask = mask.bool()
    # clamp with tensor bounds leaves V bit-exact inside the band (V_old + (V - V_old) would round), so a token
    # counts as clipped only where the clip moved V, whatever the micro-batch or the number of ranks
    clipped_v = values.clamp(min=old_values - clip, max=old_values + clip)
    plain, clipped = (values - returns) ** 2, (clipped_v - returns) ** 2
    per_token = 0.5 * torch.maximum(plain, clipped)
    m = mask.float()
    stats = dict(tokens=m.sum(), clipped=((clipped > plain) * m).sum())
    return aggregate(per_token, mask, torch.ones_like(per_token), "token-mean", normaliser), stats


def response_values(critic, mb: dict, ctx) -> torch.Tensor:
    """V(s_t) at every response position of a packed micro-batch (`pack_rows`), [b, T] float32, 0 at padding:
    the value head on the hidden state that predicts token t (the state before it), as the log-probs use.
    The critic is a token-classification model: its head is [H, 1], so no [T, V] logits ever exist."""
    mask = mb["response_mask"]
    with ctx:
        out = critic(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"],
                     use_cache=False).logits  # [b, L, 1]
    v = out.flatten(0, 1)[mb["head_index"], 0].float()  # [N] valid response tokens, row-major
    return torch.zeros(mask.shape, dtype=v.dtype, device=v.device).masked_scatter(mask, v)


@torch.no_grad()
def batch_values(critic, batch: dict, args: Args, make_ctx) -> torch.Tensor:
    """No-grad V_old of every row before the update ([B, T], 0 at padding), in token-budget micro-batches."""
    out = torch.zeros(batch["response_mask"].shape, device=batch["response_mask"].device)
    for rows in micro_batches(batch, args):
        v = response_values(critic, pack_rows(batch, rows), make_ctx())
        out[torch.tensor(rows, device=out.device)[:, None], torch.arange(v.shape[1], device=out.device)] = v
    return out


def accumulate_value_gradients(critic, batch: dict, normaliser: float, args: Args, world: int,
                               make_ctx) -> dict[str, float]:
    """`accumulate_gradients` for the critic: the value loss of each micro-batch, gradients summed over
    micro-batches and ranks (hence `world`: DDP and FSDP average). Returns its statistics summed."""
    plans = micro_batches(batch, args)
    sums: dict[str, float] = {}
    for k, rows in enumerate(plans):
        mb = pack_rows(batch, rows)
        with grad_sync(critic, enabled=k == len(plans) - 1):
            v = response_values(critic, mb, make_ctx())
            loss, stats = value_loss(v, mb["old_values"], mb["returns"], mb["response_mask"], normaliser,
                                     args.value_clip)
            (loss * world).backward()
        stats["value_loss"] = loss.detach()
        for key, x in stats.items():
            sums[key] = sums.get(key, 0.0) + float(x)
    return sums


def update_critic(critic, optimizer, batch: dict, args: Args, world: int, make_ctx) -> dict:
    """--epochs passes, one critic AdamW step per mini-batch (the policy's mini-batches), the value loss's
    token mean with the global normaliser; the same gradient clipping and non-finite skip as the policy.
    Returns {"sums", "grad_norms", "skipped", "updates"}; `make_ctx` makes a fresh autocast context per use."""
    rows = args.mini_batch_prompts // world * args.group_size
    B = batch["response_mask"].shape[0]
    sums: dict[str, float] = {}
    norms, skipped = [], 0
    for _ in range(args.epochs):
        for s in range(0, B, rows):
            mb = {k: v[s:s + rows] for k, v in batch.items()}
            N = all_reduce(mb["response_mask"].sum().double().reshape(1))
            part = accumulate_value_gradients(critic, mb, max(float(N), 1e-12), args, world, make_ctx)
            norm, was_skipped = apply_update(critic, optimizer, args.critic_lr, args.grad_clip,
                                             math.isfinite(part["value_loss"]))
            norms.append(norm)
            skipped += was_skipped
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
    return {"sums": sums, "grad_norms": norms, "skipped": skipped, "updates": len(norms)}


def explained_variance_sums(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """This rank's sums for explained variance 1 - Var(R - V) / (Var(R) + 1e-5) over the step's valid tokens
    (verl's vf_explained_var), all-reduced by `log_step` so it does not depend on the world size."""
    m = mask.bool()
    R, D = returns[m].double(), (returns - values)[m].double()
    return dict(ev_n=float(m.sum()), ev_r=float(R.sum()), ev_r2=float((R * R).sum()), ev_d=float(D.sum()),
                ev_d2=float((D * D).sum()))


# ==============================================================================================
# 6. One RL step: rollout -> reward -> advantages -> update -> log -> validate / checkpoint


def compute_advantages(args: Args, responses, mask, rewards, entropy, tree=None) -> torch.Tensor:
    """A [B, T] float32 for `--method`; 0 at padding. `tree`: advantages.prefix_tree of these rows, or None."""
    G = args.group_size
    if args.method == "grpo":
        return advantages.grpo_advantages(rewards, G, scale=args.scale)[:, None] * mask
    if args.method == "tempo":
        return advantages.tempo_advantages(responses, mask, rewards, G, td_weight=args.td_weight,
                                           scale=args.scale, scale_td=args.scale_td, tree=tree)
    if args.method in ("treeadv", "treeadv-centred"):
        return advantages.treeadv_advantages(responses, mask, rewards, G, scale=args.scale, tree=tree,
                                             centred=args.method == "treeadv-centred")
    others = dict(treerl=advantages.treerl_advantages, treepo=advantages.treepo_advantages,
                  spo=advantages.spo_advantages)  # the field's other tree estimators: their own scale, no --scale
    if args.method in others:
        return others[args.method](responses, mask, rewards, G, tree=tree)
    return advantages.hepo_advantages(entropy, mask, rewards, G, rho=args.hepo_rho, scale=args.scale)


def step_prompts(step: int, n: int, P: int, seed: int) -> tuple[list[int], int, int]:
    """The P prompt indices of a step, and its data position (pass, offset): passes over the n prompts
    in a fresh seeded order each, dropping the last incomplete batch of a pass."""
    per_pass = n // P
    p, k = divmod(step, per_pass)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + p)).tolist()
    return order[k * P:(k + 1) * P], p, k * P


def sample_seed(seed: int, step: int) -> int:
    """The seed of a step's randomness, one per (run seed, step) and the same on every rank: the sampler
    tells prompts apart by their place in the step (`prompt_keys`), so no rank number enters."""
    return (seed * 1_000_003 + step) * 65_537


@dataclass
class Run:
    """What the loop carries from step to step (built once by `start_run`; a record, no behaviour)."""
    args: Args
    worker: Worker
    model: torch.nn.Module  # the policy: fp32 master weights, wrapped for DDP / FSDP2
    ref: torch.nn.Module | None  # the frozen KL reference, loaded and wrapped as the policy
    optimizer: torch.optim.Optimizer
    tokenizer: object
    train_ex: list[dict]
    prompts: list[list[int]]
    val_ex: list[dict]
    cfg: rollout.SamplingConfig
    eos_ids: list[int]
    make_ctx: object  # () -> a fresh autocast context (a null one under FSDP2 or fp32)
    recompute_old: bool
    start: int
    t_run: float  # time.time() at step 0: the wall clock continues across a resume
    nonfinite_run: int = 0
    val_acc: list = field(default_factory=list)
    critic: torch.nn.Module | None = None  # --method ppo: the value model, wrapped as the policy
    critic_optimizer: torch.optim.Optimizer | None = None


class Clock:
    """Wall-clock laps; the accelerator is synchronised first, so a lap holds its kernels."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.t = self.now()

    def now(self) -> float:
        _sync(self.worker)
        return time.time()

    def lap(self) -> float:
        t, self.t = self.t, self.now()
        return self.t - t


def rank_places(rank: int, world: int, P: int, M: int) -> list[int]:
    """The places (0..P-1) in a step's prompt list that `rank` owns: its 1/world share of each M-prompt
    mini-batch, in mini-batch order. So mini-batch k holds the same prompts on any number of ranks, and
    each rank's k-th block of rows is its share of it."""
    m = M // world
    return [k * M + rank * m + j for k in range(P // M) for j in range(m)]


def rollout_step(run: Run, step: int) -> tuple[rollout.Rollout, list[int], dict]:
    """This rank's share of the step's prompts, G responses each; prompts keyed by their place in the step."""
    args, worker = run.args, run.worker
    idx, data_pass, data_offset = step_prompts(step, len(run.prompts), args.prompts_per_step, args.seed)
    keys = rank_places(worker.rank, worker.world_size, args.prompts_per_step, args.mini_batch_prompts)
    idx = [idx[k] for k in keys]
    with sampling_mode(run.model) as policy, run.make_ctx():
        cfg = run.cfg  # on CUDA the budget defaults to what free memory holds, AdamW's states to come kept
        if cfg.kv_budget is None and worker.device.type == "cuda":
            budget = rollout.default_kv_budget(policy, rows=len(idx) * args.group_size, optimizer=run.optimizer)
            cfg = dataclasses.replace(cfg, kv_budget=budget)
        ro = rollout.sample(policy, [run.prompts[i] for i in idx], args.group_size, cfg, eos_token_ids=run.eos_ids,
                            pad_token_id=run.tokenizer.pad_token_id, seed=sample_seed(args.seed, step),
                            prompt_keys=keys)
    return ro, idx, {"data_pass": data_pass, "data_offset": data_offset}


def reward_step(run: Run, ro: rollout.Rollout, idx: list[int]) -> tuple[torch.Tensor, dict, list[str]]:
    """evaluate.py's verifier, one reward per response: (rewards [B], counters, completions)."""
    lengths = ro.response_mask.sum(1).tolist()
    completions = [run.tokenizer.decode(r[:n], skip_special_tokens=True)
                   for r, n in zip(ro.response_ids.tolist(), lengths)]
    examples = [run.train_ex[i] for i in idx for _ in range(run.args.group_size)]
    rewards, counters = evaluate.score_batch(run.args.task, completions, examples)
    return torch.tensor(rewards, dtype=torch.float32, device=ro.response_mask.device), counters, completions


def critic_step(run: Run, ro: rollout.Rollout) -> torch.Tensor | None:
    """--method ppo: V_old [B, T] of this rank's rows, the critic's no-grad values before the update (SPEC 9)."""
    if run.critic is None:
        return None
    batch = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, response_ids=ro.response_ids,
                 response_mask=ro.response_mask)
    return batch_values(unwrap(run.critic), batch, run.args, run.make_ctx)


def advantage_step(run: Run, ro: rollout.Rollout, r: torch.Tensor, step: int, values: torch.Tensor | None = None):
    """(A [B, T], token weights [B, T], SPEC 8 diagnostics, returns [B, T] or None) for this rank's rows,
    computed on the whole step's batch (every rank's groups, in rank order: per-group and batch-wide
    statistics do not depend on the order of the groups), so nothing depends on the world size.
    --method ppo: GAE from `values` (V_old), whitened over every rank's valid tokens; returns R for the critic."""
    args, worker, G = run.args, run.worker, run.args.group_size
    mask = ro.response_mask  # [B, T] bool
    B, T = mask.shape
    mine = slice(worker.rank * B, (worker.rank + 1) * B)  # this rank's rows of the step's batch: whole groups
    resp_all, mask_all = gather_rows(ro.response_ids), gather_rows(mask.long()).bool()
    r_all, ent_all = gather_rows(r[:, None])[:, 0], gather_rows(ro.entropy)
    if args.shuffle_rewards:  # the control: rewards no longer belong to their responses
        g = torch.Generator().manual_seed(sample_seed(args.seed, step))
        r_all = r_all[torch.randperm(len(r_all), generator=g).to(r_all.device)]
    tree = advantages.prefix_tree(resp_all, mask_all, G)  # SPEC 2, once: advantages, diagnostics, weights
    returns = None
    if args.method == "ppo":
        A_all, R_all = advantages.gae_advantages(r_all, gather_rows(values), mask_all, args.gamma, args.lam)
        A = advantages.whiten(A_all, mask_all)[mine, :T]
        returns = R_all[mine, :T]
    else:
        A = compute_advantages(args, resp_all, mask_all, r_all, ent_all, tree)[mine, :T]
    diag = advantages.branch_diagnostics(resp_all, mask_all, r_all, G, tree=tree)
    weight = torch.ones_like(A)
    if args.unique_segments:  # SPEC 5b: n copies of a shared token, weight 1/n each = trained once
        n = advantages.prefix_counts(ro.response_ids, mask, G, tree=tree.rows(mine))  # [B, T]
        weight = 1.0 / n.clamp(min=1).float()
    return A, weight, diag, returns


def update_step(run: Run, ro: rollout.Rollout, A: torch.Tensor, weight: torch.Tensor, lr: float,
                values: torch.Tensor | None = None, returns: torch.Tensor | None = None) -> dict:
    """Old log-probs (the sampler's, or recomputed), reference log-probs, then `update_policy`; with a
    critic (--method ppo) then `update_critic` on (V_old = values, R = returns)."""
    args, clock = run.args, Clock(run.worker)
    batch = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, response_ids=ro.response_ids,
                 response_mask=ro.response_mask, A=A, weight=weight)
    batch["old_logp"] = batch_logprobs(unwrap(run.model), batch, args, run.make_ctx()) if run.recompute_old \
        else ro.logprobs
    if run.ref is not None:
        batch["ref_logp"] = batch_logprobs(run.ref, batch, args, run.make_ctx())
    t_logprob = clock.lap()
    upd = update_policy(run.model, run.optimizer, batch, args, run.worker.world_size, lr, run.make_ctx)
    upd.update(t_logprob=t_logprob, t_update=clock.lap())
    if run.critic is not None:
        cbatch = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, response_ids=ro.response_ids,
                      response_mask=ro.response_mask, old_values=values, returns=returns)
        upd["critic"] = update_critic(run.critic, run.critic_optimizer, cbatch, args, run.worker.world_size,
                                      run.make_ctx)
        upd["critic"]["sums"].update(explained_variance_sums(values, returns, ro.response_mask))
        upd["t_critic_update"] = clock.lap()
    return upd


def log_step(run: Run, step: int, ro: rollout.Rollout, r: torch.Tensor, counters: dict, A: torch.Tensor,
             diag: dict, upd: dict, times: dict) -> dict:
    """The step's metrics row: sums over every rank (one all-reduce), then ratios."""
    args, mask, s, first = run.args, ro.response_mask, upd["sums"], upd["first"]
    local = dict(reward=float(r.sum()), rows=float(mask.shape[0]), tokens=float(mask.sum()),
                 entropy=float((ro.entropy * mask).sum()), truncated=float((~ro.finished).sum()),
                 decoded=float(ro.decoded_tokens), prefilled=float(ro.prefilled_tokens), adv_abs=float(A.abs().sum()),
                 first_diff=first["old_logp_diff"], first_tokens=first["tokens"],
                 **{f"c_{k}": float(v) for k, v in counters.items()},
                 **{f"s_{k}": v for k, v in s.items() if not k.endswith("_max")},
                 **{f"v_{k}": v for k, v in upd.get("critic", {}).get("sums", {}).items()})
    tot = dict(zip(local, all_reduce(torch.tensor(list(local.values()), dtype=torch.float64,
                                                  device=mask.device)).tolist()))
    diff_max = float(all_reduce(torch.tensor([first["old_logp_diff_max"]], device=mask.device), dist.ReduceOp.MAX))
    t_step = sum(times.values()) + upd["t_logprob"] + upd["t_update"]
    m = dict(step=step + 1, lr=lr_at(step, args),
             reward_mean=tot["reward"] / tot["rows"], response_len=tot["tokens"] / tot["rows"],
             truncated_frac=tot["truncated"] / tot["rows"], decoded_tokens=int(tot["decoded"]),
             prefilled_tokens=int(tot["prefilled"]), entropy=tot["entropy"] / tot["tokens"],
             adv_abs_mean=tot["adv_abs"] / tot["tokens"], **diag,
             loss=tot["s_loss"] / upd["updates"], clip_frac=tot["s_clipped"] / tot["s_tokens"],
             dual_clip_frac=tot["s_dual_clipped"] / tot["s_tokens"], approx_kl=tot["s_approx_kl"] / tot["s_tokens"],
             grad_norm=sum(upd["grad_norms"]) / upd["updates"], skipped_updates=upd["skipped"],
             **({"kl_ref": tot["s_kl_ref"] / tot["s_tokens"]} if "s_kl_ref" in tot else {}),
             old_logp_diff_mean=tot["first_diff"] / tot["first_tokens"], old_logp_diff_max=diff_max,
             update_pad_ratio=tot["s_positions"] / tot["s_real_positions"],
             **{f"reward_{k[2:]}": int(v) for k, v in tot.items() if k.startswith("c_")},
             **times, t_logprob=upd["t_logprob"], t_update=upd["t_update"], t_step=t_step,
             tokens_per_s=tot["tokens"] / t_step, decode_tokens_per_s=tot["decoded"] / times["t_rollout"],
             update_tokens_per_s=args.epochs * tot["tokens"] / upd["t_update"], peak_mem_gb=peak_memory_gb(run.worker))
    if "critic" in upd:
        m.update(critic_metrics(tot, upd["critic"]))
    run.nonfinite_run = run.nonfinite_run + 1 if upd["skipped"] else 0
    if upd["skipped"]:
        print0(f"step {step + 1}: non-finite loss or gradient, {upd['skipped']} update(s) skipped "
               f"({run.nonfinite_run} step(s) in a row)")
    return m


def critic_metrics(tot: dict, crit: dict) -> dict:
    """The critic's part of the metrics row from `log_step`'s all-reduced sums (keys v_*): value loss (mean
    over its updates), value clip fraction, explained variance of R by V_old, its grad norm and skips."""
    n = max(tot["v_ev_n"], 1.0)
    var_r = tot["v_ev_r2"] / n - (tot["v_ev_r"] / n) ** 2
    var_d = tot["v_ev_d2"] / n - (tot["v_ev_d"] / n) ** 2
    return dict(value_loss=tot["v_value_loss"] / crit["updates"],
                value_clip_frac=tot["v_clipped"] / max(tot["v_tokens"], 1.0),
                explained_variance=1.0 - var_d / (var_r + 1e-5),
                critic_grad_norm=sum(crit["grad_norms"]) / crit["updates"], critic_skipped_updates=crit["skipped"])


def validate_step(run: Run, step: int) -> dict:
    """Greedy accuracy on the validation examples at step 0, every --val-every steps and after the last."""
    args = run.args
    if not args.val_every or not (step % args.val_every == 0 or step == args.steps):
        return {}
    t = time.time()
    with sampling_mode(run.model) as policy, run.make_ctx():
        summary, _ = evaluate.evaluate(policy, run.tokenizer, args.task, run.val_ex, n=1, temperature=0.0,
                                       max_new_tokens=args.max_new_tokens, batch_size=args.val_batch_size,
                                       thinking=args.thinking, seed=args.seed, progress=False,
                                       kv_budget=args.kv_budget, page_size=args.page_size,
                                       compile_decode=args.compile_decode)
    run.val_acc.append((step, summary["accuracy"]))
    return {"val_acc": summary["accuracy"], "val_response_tokens": summary["mean_response_tokens"],
            "val_truncated_frac": summary["truncated_frac"], "t_val": time.time() - t}


def checkpoint_step(run: Run, step: int) -> bool:
    """Save every --save-every steps, after the last and when a stop was requested on any rank; stop after
    --max-nonfinite skipped steps in a row. Returns whether to stop."""
    args, worker = run.args, run.worker
    done = step + 1
    stop = bool(all_reduce(torch.tensor([float(STOP["requested"])], device=worker.device), dist.ReduceOp.MAX).item())
    if args.save_every and (done % args.save_every == 0 or done == args.steps or stop):
        next_pass, next_k = divmod(done, len(run.prompts) // args.prompts_per_step)
        state = {"step": done, "wall_s": time.time() - run.t_run, "nonfinite_in_a_row": run.nonfinite_run,
                 "data_pass": next_pass, "data_offset": next_k * args.prompts_per_step,
                 "world_size": worker.world_size, "seed": args.seed}
        save_checkpoint(args.out, done, run.model, run.optimizer, run.tokenizer, state, worker, args.keep_last,
                        critic=None if run.critic is None else (run.critic, run.critic_optimizer))
    if run.nonfinite_run >= args.max_nonfinite:
        raise StopRun(f"{run.nonfinite_run} steps in a row had a non-finite loss or gradient; stopping "
                      f"(see {os.path.join(args.out, 'metrics.jsonl')}; try a lower --lr)")
    if stop:
        print0(f"stopped at step {done}" + (f"; continue with --resume --out {args.out}" if args.save_every else ""))
    return stop


def write_sample(run: Run, step: int, idx: list[int], completions: list[str], r: torch.Tensor, A: torch.Tensor):
    """One group's completions, rewards and first-token advantages to samples.jsonl (rank 0, every --sample-every)."""
    args, G = run.args, run.args.group_size
    if run.worker.rank == 0 and args.sample_every and (step + 1) % args.sample_every == 0:
        _append_jsonl(os.path.join(args.out, "samples.jsonl"), {
            "step": step + 1, "prompt": run.tokenizer.decode(run.prompts[idx[0]]), "completions": completions[:G],
            "rewards": r[:G].tolist(), "advantage_first_token": A[:G, 0].tolist()})


# ==============================================================================================
# 7. The loop


def train(args: Args, worker: Worker | None = None, model=None, tokenizer=None) -> dict:
    """Run (or resume) RL training; returns {"val_acc": [(step, acc), ...], "steps": last step, "out": OUT}.

    `model`/`tokenizer` may be given (the benchmark's random shapes); otherwise --model is loaded.
    """
    with collective_errors(args):
        set_phase("setup", 0)
        run = start_run(args, worker, model, tokenizer)
        if run.start == 0 and args.val_every:
            set_phase("validation", 0)
            row = {"step": 0, "wall_s": time.time() - run.t_run, **validate_step(run, 0)}
            write_metrics(run, row)
            print0(f"step 0: validation accuracy {row['val_acc']:.3f}")
        step = run.start
        with stop_requested_by_signals(), progress_bar(run) as bar:
            for step in range(run.start, args.steps):
                if train_step(run, step, bar):
                    break
    if run.worker.rank == 0:
        print(f"wrote {wrote(args)}", flush=True)
    return {"val_acc": run.val_acc, "steps": step + 1 if args.steps > run.start else run.start, "out": args.out,
            "stopped": STOP["requested"]}


def train_step(run: Run, step: int, bar) -> bool:
    """One RL step, each phase named for the message of a collective that times out; returns whether to stop."""
    args, clock = run.args, Clock(run.worker)
    set_phase("rollout", step + 1)
    _test_hang(run.worker.rank, step + 1)
    ro, idx, data = rollout_step(run, step)
    t_rollout = clock.lap()
    set_phase("reward")
    r, counters, completions = reward_step(run, ro, idx)
    t_reward = clock.lap()
    set_phase("critic values")
    values = critic_step(run, ro)  # --method ppo: V_old, else None
    t_values = clock.lap()
    set_phase("advantages (gathering every rank's rollout)")
    A, weight, diag, returns = advantage_step(run, ro, r, step, values)
    t_advantage = clock.lap()
    set_phase("update")
    upd = update_step(run, ro, A, weight, lr_at(step, args), values, returns)
    times = dict(t_rollout=t_rollout, t_reward=t_reward, t_advantage=t_advantage)
    if values is not None:  # the critic's cost: its value pass and its update
        times["t_critic"] = t_values + upd.pop("t_critic_update")
    set_phase("logging")
    m = log_step(run, step, ro, r, counters, A, diag, upd, times)
    write_sample(run, step, idx, completions, r, A)
    set_phase("validation")
    m.update(validate_step(run, step + 1), **data, wall_s=time.time() - run.t_run)
    write_metrics(run, m)
    bar.update(1)
    bar.set_postfix(reward=f"{m['reward_mean']:.3f}", **({"val": f"{m['val_acc']:.3f}"} if "val_acc" in m else {}))
    set_phase("checkpoint")
    return checkpoint_step(run, step)


# What this rank is doing, and in which step: named when a collective times out (`collective_errors`).
PHASE = {"name": "setup", "step": 0}


def set_phase(name: str, step: int | None = None) -> None:
    PHASE["name"] = name
    if step is not None:
        PHASE["step"] = step


@contextlib.contextmanager
def collective_errors(args: Args):
    """A collective that times out (after --dist-timeout) or loses a peer becomes a StopRun naming this rank's
    phase and step. Why: the backend's own error names a socket or a sequence number, not what the run was
    doing, and a timeout's cause is usually another rank hung or too slow in that phase (a rank that waits
    in the gather after the rollout is waiting for another one's rollout). Other errors pass unchanged."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        timed_out = bool(re.search(r"timed out|timeout", text, re.I))
        lost = isinstance(e, getattr(dist, "DistError", ())) or re.search(
            r"connection (closed|reset)|broken pipe", text, re.I)
        if isinstance(e, StopRun) or not dist.is_initialized() or not (timed_out or lost):
            raise
        where = f"rank {dist.get_rank()}, step {PHASE['step']}, phase {PHASE['name']}"
        cause = (f"a collective waited longer than --dist-timeout {args.dist_timeout:g} min: another rank is hung or "
                 "slower than that (raise --dist-timeout if it is only slow)" if timed_out
                 else "another rank failed or was killed (see its message)")
        raise StopRun(f"{where}: {cause}; {text.splitlines()[0][:200] if text else type(e).__name__}") from e


def _test_hang(rank: int, step: int) -> None:
    """Tests only: TRAIN_TEST_HANG=RANK:STEP makes that rank stop answering at the start of that step (it
    sleeps until a signal: torchrun's SIGTERM once the others have given up), as a frozen GPU would."""
    spec = os.environ.get("TRAIN_TEST_HANG")
    if spec and [int(x) for x in spec.split(":")] == [rank, step]:
        print(f"[rank {rank}] TRAIN_TEST_HANG: hanging at step {step}", file=sys.stderr, flush=True)
        deadline = time.time() + 600
        while not STOP["requested"] and time.time() < deadline:
            time.sleep(0.1)


def start_run(args: Args, worker: Worker | None = None, model=None, tokenizer=None) -> Run:
    """Everything before the first step: arguments checked, data, models, optimizer, then the resumed
    state or a fresh OUT. Data comes first: a wrong --task/--data fails in seconds, before a model loads."""
    worker = checked_and_joined(args, worker)
    compute_dtype = rollout.compute_dtype(args.dtype, worker.device)
    torch.manual_seed(args.seed + worker.rank)
    random.seed(args.seed + worker.rank)
    try:  # every row is checked here, named by file and line: a user error, before a model loads
        train_ex = evaluate.load_examples(args.task, "train", data=args.data, limit=args.train_limit, seed=args.seed)
        val_ex = evaluate.load_examples(args.task, "test", data=args.val_data, limit=args.val_limit, seed=args.seed,
                                        flag="--val-data") if args.val_every else []
    except ValueError as e:
        raise UserError(str(e)) from None
    loaded = resume_run(args, worker, compute_dtype, model, tokenizer) if args.resume else None
    if loaded is None:
        model, ref, tokenizer = load_models(args, worker, compute_dtype, None, model, tokenizer)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        critic, critic_optimizer = make_critic(args, worker, compute_dtype, model, None)
        start, wall0, nonfinite_run = 0, 0.0, 0
        prepare_out(args, worker, compute_dtype)
    else:
        model, ref, tokenizer, optimizer, (critic, critic_optimizer), state = loaded
        start, wall0, nonfinite_run = state["step"], state["wall_s"], state["nonfinite_in_a_row"]
    train_ex, prompts = training_prompts(args, train_ex, tokenizer)
    if dist.is_initialized():
        dist.barrier()
    recompute = args.recompute_logprobs == "always" or (args.recompute_logprobs == "auto" and (
        compute_dtype != torch.float32 or args.top_p < 1 or args.top_k > 0))
    return Run(args=args, worker=worker, model=model, ref=ref, optimizer=optimizer, tokenizer=tokenizer,
               train_ex=train_ex, prompts=prompts, val_ex=val_ex, cfg=sampling_config(args),
               eos_ids=rollout.eos_token_ids(unwrap(model), tokenizer),
               make_ctx=lambda: autocast(model, worker, compute_dtype), recompute_old=recompute, start=start,
               t_run=time.time() - wall0, nonfinite_run=nonfinite_run, critic=critic, critic_optimizer=critic_optimizer)


def resume_run(args: Args, worker: Worker, compute_dtype: torch.dtype, model=None, tokenizer=None):
    """--resume: (policy, reference, tokenizer, optimizer, (critic, its optimizer), trainer state) from OUT's
    newest checkpoint that is complete and loads, or None when OUT holds no run at all (a fresh start). Never
    deletes anything: a checkpoint that fails is skipped with the reason, and a run with no usable checkpoint
    stops with a message.
    On success the flags are checked against OUT/config.json and the logs trimmed to the checkpoint's step."""
    from torch.distributed.checkpoint.api import CheckpointException
    changed = check_resume_config(args)
    candidates = resumable_checkpoints(args.out)
    for ckpt in candidates:
        try:
            policy, ref, tok = load_models(args, worker, compute_dtype, ckpt, model, tokenizer)
            optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            state = load_training_state(ckpt, policy, optimizer, worker)
            critic = make_critic(args, worker, compute_dtype, policy, ckpt)
            error = None
        except (Exception, CheckpointException) as e:  # a damaged file raises what its reader raises (DCP's
            text = str(e).strip()                         # CheckpointException is a BaseException)
            error = f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
        failed = all_reduce(torch.tensor([float(error is not None)], device=worker.device), dist.ReduceOp.MAX).item()
        if failed:  # every rank moves on together, whichever rank could not read its part
            print0(f"skipped {ckpt}: loading failed" + (f" ({error})" if error else " on another rank"))
            continue
        print0(f"resumed from {ckpt} at step {state['step']}")
        if worker.rank == 0:
            trim_logs(args.out, state["step"])
            write_config(args, worker, compute_dtype, changed, state["step"])
        return policy, ref, tok, optimizer, critic, state
    if candidates:
        raise UserError(f"--resume: no checkpoint in {args.out} could be loaded (each is named above, with why); "
                        "start afresh with --overwrite, or use another --out")
    print0(f"--resume: {args.out} holds no run yet; starting fresh")
    return None


def sampling_config(args: Args) -> rollout.SamplingConfig:
    """rollout's SamplingConfig from the flags (the tree's None flags leave rollout's defaults)."""
    tree = dict(tau=args.tree_tau, num_chains=args.tree_chains, max_children=args.tree_children,
                max_forks=args.tree_forks)
    return rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, sampler=args.sampler, kv_budget=args.kv_budget,
                                  page_size=args.page_size, compile=args.compile_decode,
                                  **{k: v for k, v in tree.items() if v is not None})


def training_prompts(args: Args, train_ex: list[dict], tokenizer) -> tuple[list[dict], list[list[int]]]:
    """The examples whose prompt fits --max-prompt-tokens, and their prompt token ids."""
    prompts = [evaluate.prompt_ids(args.task, ex, tokenizer, args.thinking) for ex in train_ex]
    keep = [i for i, q in enumerate(prompts) if len(q) <= args.max_prompt_tokens]
    if len(keep) < len(prompts):
        print0(f"dropped {len(prompts) - len(keep)} prompts longer than --max-prompt-tokens {args.max_prompt_tokens}")
    if len(keep) < args.prompts_per_step:
        raise UserError(f"--prompts-per-step {args.prompts_per_step}: the training set has only {len(keep)} prompts")
    return [train_ex[i] for i in keep], [prompts[i] for i in keep]


def prepare_out(args: Args, worker: Worker, compute_dtype: torch.dtype) -> None:
    """A fresh run: OUT emptied of an earlier run's files (check_args let that through only with --overwrite;
    --resume reaches here only when OUT holds no run, and deletes nothing), config.json written (rank 0)."""
    if worker.rank != 0:
        return
    if os.path.exists(os.path.join(args.out, "metrics.jsonl")) or checkpoint_dirs(args.out):
        print(f"replacing the earlier run in {args.out}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    for name in [] if args.resume else os.listdir(args.out):  # nothing of an earlier run may pass for this one's
        if name.startswith("ckpt-"):
            shutil.rmtree(os.path.join(args.out, name))
        elif name in ("metrics.jsonl", "samples.jsonl", "latest", "plot.png"):
            os.remove(os.path.join(args.out, name))
    write_config(args, worker, compute_dtype)


def write_config(args: Args, worker: Worker, compute_dtype: torch.dtype, changed: dict | None = None,
                 step: int = 0) -> None:
    """OUT/config.json: the flags of the run (rank 0; replaced atomically). On a resume with --resume-override the
    changed fields are appended to its `overrides` list with the step they apply from."""
    path = os.path.join(args.out, "config.json")
    overrides = []
    if changed:
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                overrides = json.load(f).get("overrides", [])
        overrides.append({"from_step": step, **{k: {"was": old, "now": new} for k, (old, new) in changed.items()}})
    with open(path + ".tmp", "w") as f:
        json.dump({**dataclasses.asdict(args), "world_size": worker.world_size, "compute_dtype": str(compute_dtype),
                   "device": str(worker.device), **({"overrides": overrides} if overrides else {})}, f, indent=1)
    os.replace(path + ".tmp", path)


# Flags that may differ between a run and its --resume: how long it runs and how often it logs, validates and
# saves; where it writes; how it uses the hardware (micro-batching, chunking, KV budget, compilation,
# checkpointing of activations, device, timeout), which by design changes no result; and the stop rule
# for non-finite steps. Every other flag defines the experiment: a change is refused without --resume-override.
RESUME_FREE = ("steps", "save_every", "keep_last", "val_every", "val_batch_size", "sample_every", "out", "resume",
               "resume_override", "overwrite", "progress", "dist_timeout", "device", "micro_batch_tokens",
               "micro_batch_rows", "logit_chunk", "kv_budget", "page_size", "compile_decode", "grad_ckpt",
               "max_nonfinite")


def check_resume_config(args: Args) -> dict:
    """{field: (saved, now)} for the flags that differ from OUT/config.json outside RESUME_FREE; a UserError
    naming them unless --resume-override. {} when OUT has no config.json (no run yet)."""
    path = os.path.join(args.out, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if args.resume_override:
            return {}
        raise UserError(f"--resume: {path} is unreadable ({e}); pass --resume-override to resume without "
                        "comparing the flags") from None
    now = json.loads(json.dumps(dataclasses.asdict(args)))  # as the file holds them (tuples as lists, ...)
    changed = {k: (saved[k], v) for k, v in now.items() if k not in RESUME_FREE and k in saved and saved[k] != v}
    if changed and not args.resume_override:
        diff = ", ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changed.items())
        raise UserError(f"--resume: the flags differ from {path}: {diff}; pass --resume-override to continue with "
                        "the new values, or use another --out")
    if changed:
        print0("--resume-override: continuing with " + ", ".join(f"{k} = {new} (was {old})"
                                                                for k, (old, new) in changed.items()))
    return changed


def trim_logs(out: str, step: int) -> None:
    """On resume (rank 0): drop the metrics and samples rows logged after the checkpoint's step, which the
    resumed run logs again. Each file is rewritten to a temporary file and renamed, so a kill leaves it whole."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            rows = [r for r in read_jsonl(path) if r["step"] <= step]
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(path + ".tmp", path)


def wrote(args: Args) -> str:
    """What a run leaves in OUT, for its last line: the metrics, their plot (drawn now), the newest checkpoint."""
    metrics = os.path.join(args.out, "metrics.jsonl")
    plot = plot_runs([args.out], os.path.join(args.out, "plot.png"), labels=[args.method])
    ckpt = latest_checkpoint(args.out)
    return f"{metrics}, {plot}" + (f", checkpoint {ckpt}" if ckpt else " (no checkpoint: --save-every 0)")


def write_metrics(run: Run, row: dict) -> None:
    if run.worker.rank == 0:
        _append_jsonl(os.path.join(run.args.out, "metrics.jsonl"), row)


@contextlib.contextmanager
def progress_bar(run: Run):
    from tqdm.auto import tqdm
    bar = tqdm(total=run.args.steps, initial=run.start, desc=run.args.method, dynamic_ncols=True,
               disable=not run.args.progress or run.worker.rank != 0)
    try:
        yield bar
    finally:
        bar.close()


# ==============================================================================================
# 8. Arguments: presets, the command line, checks (before anything is loaded)


# The demo's settings (README "Running it" has the runs that chose them). Flags given on the command line win.
DEMO = dict(model="tiny", tiny_hidden=128, tiny_layers=4, task="add", train_limit=None, val_limit=500,
            group_size=8, prompts_per_step=64, mini_batch_prompts=64, micro_batch_rows=512, max_new_tokens=8,
            lr=2e-4, warmup_steps=10, steps=200, val_every=50, save_every=200, sample_every=50,
            device="cpu", dtype="fp32", grad_ckpt=False, max_prompt_tokens=64, overwrite=True)
# GSPO as its paper states it and verl's gspo loss runs it: sequence mean of token means, a sequence
# ratio clipped to [1 - 3e-4, 1 + 4e-4], no dual clip.
GSPO_PAPER = dict(objective="gspo", loss_agg="seq-mean", clip_low=3e-4, clip_high=4e-4, dual_clip=0.0)


def parse_args(argv: list[str] | None = None, preset: dict | None = None) -> Args:
    """Args from the command line. Defaults: the field's, then `preset` (a benchmark's), then DEMO/GSPO_PAPER
    for --demo/--gspo-paper, then the flags given."""
    parser = evaluate.dataclass_parser(Args, __doc__.splitlines()[0])
    given = vars(parser.parse_args(argv))
    presets = [preset or {}] + [p for flag, p in (("demo", DEMO), ("gspo_paper", GSPO_PAPER)) if given.get(flag)]
    args = Args(**{k: v for p in presets for k, v in p.items()} | given)
    if args.out is None:  # derived: the run directory
        args.out = os.path.join("runs", "demo-" + args.method if args.demo else f"{args.method}-{args.task}")
    return args


# SamplingConfig's fields that train.py names otherwise (the rest share their names with the flags).
SAMPLER_FLAGS = dict(tau="tree_tau", num_chains="tree_chains", max_children="tree_children", max_forks="tree_forks",
                     compile="compile_decode")
# Count flags and their least value; a None flag (where the field allows it) means "the default" and is not checked.
AT_LEAST = dict(tiny_hidden=8, tiny_layers=1, epochs=1, prompts_per_step=1, mini_batch_prompts=1, micro_batch_tokens=1,
                micro_batch_rows=1, max_new_tokens=1, max_prompt_tokens=1, logit_chunk=1, val_batch_size=1,
                max_nonfinite=1, keep_last=1, warm_steps=1, warm_batch=1, train_limit=1, val_limit=1, kv_budget=1,
                page_size=1, tree_chains=1, tree_children=2, tree_forks=0, group_size=2, top_k=0, steps=0, warmup_steps=0,
                val_every=0, save_every=0, sample_every=0, seed=0)


def check_args(args: Args, world_size: int = 1) -> None:
    """UserError naming the flag for every invalid value or combination, before anything loads (the caller
    passes the world size from the environment: this runs before the process group exists)."""
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    def choose(flag: str, value, options):
        need(value in options, f"--{flag} {value!r}: choose from {', '.join(options)}")

    for f in dataclasses.fields(Args):  # every number by its flag: finite floats, counts at their least
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float):  # --tree-tau inf is rollout's "never fork"
            need(math.isfinite(value) or (f.name == "tree_tau" and value == math.inf),
                 f"{flag} {value}: must be a finite number")
        if f.name in AT_LEAST and value is not None:
            need(value >= AT_LEAST[f.name], f"{flag} {value}: must be at least {AT_LEAST[f.name]}")
    choose("method", args.method, METHODS)
    choose("scale", args.scale, advantages.SCALES)
    choose("objective", args.objective, OBJECTIVES)
    choose("loss-agg", args.loss_agg, LOSS_AGGS)
    choose("sampler", args.sampler, ("flat", "tree"))
    choose("task", args.task, evaluate.BENCHES)
    choose("recompute-logprobs", args.recompute_logprobs, RECOMPUTE)
    choose("dtype", args.dtype, ("auto", "bf16", "fp32"))
    need(args.tiny_hidden % 8 == 0,
         f"--tiny-hidden {args.tiny_hidden}: must be a multiple of 8 (4 heads of an even size)")
    need(args.method == "tempo" or (args.td_weight == 1.0 and args.scale_td),
         "--td-weight / --no-scale-td apply to --method tempo only")
    need(not args.unique_segments or args.method == "treeadv",
         "--unique-segments is TreeAdv's mode: use --method treeadv")
    need(not args.gspo_paper or args.objective == "gspo", "--gspo-paper is GSPO's setting: it needs --objective gspo")
    need(0 < args.hepo_rho <= 1, f"--hepo-rho {args.hepo_rho}: must be in (0, 1]")
    need(0 <= args.clip_low < 1, f"--clip-low {args.clip_low}: must be in [0, 1)")
    need(args.clip_high >= 0, f"--clip-high {args.clip_high}: must be >= 0")
    need(args.dual_clip == 0 or args.dual_clip > 1, f"--dual-clip {args.dual_clip}: must be > 1 (or 0 = off)")
    need(args.kl_coef >= 0, f"--kl-coef {args.kl_coef}: must be >= 0")
    need(args.method == "ppo" or (args.critic_lr, args.gamma, args.lam, args.value_clip) == (1e-5, 1.0, 1.0, 0.5),
         "--critic-lr / --gamma / --lam / --value-clip apply to --method ppo only")
    need(args.critic_lr > 0 and 0 < args.gamma <= 1 and 0 <= args.lam <= 1 and args.value_clip > 0,
         f"--critic-lr {args.critic_lr} / --gamma {args.gamma} / --lam {args.lam} / --value-clip {args.value_clip}: "
         "need critic_lr > 0, 0 < gamma <= 1, 0 <= lam <= 1, value_clip > 0")
    need(args.temperature > 0, f"--temperature {args.temperature}: training needs > 0 (log-probs of logits / T)")
    try:  # the sampler's own rules, named by train.py's flags
        rollout.check_config(sampling_config(args), args.group_size, args.max_prompt_tokens)
    except ValueError as e:
        flag = lambda m: "--" + SAMPLER_FLAGS.get(m[1], m[1]).replace("_", "-") + " "  # noqa: E731
        raise UserError(re.sub(r"cfg\.(\w+)=", flag, str(e))) from None
    need(args.recompute_logprobs != "never" or (args.top_p == 1 and args.top_k == 0),
         "--recompute-logprobs never: with --top-p/--top-k the sampler's log-probs are of the truncated distribution, "
         "not the policy's")
    need(args.lr > 0, f"--lr {args.lr}: must be > 0")
    need(args.warm_lr > 0, f"--warm-lr {args.warm_lr}: must be > 0")
    need(args.weight_decay >= 0, f"--weight-decay {args.weight_decay}: must be >= 0")
    need(args.grad_clip >= 0, f"--grad-clip {args.grad_clip}: must be >= 0 (0 = off)")
    need(args.prompts_per_step % args.mini_batch_prompts == 0,
         f"--prompts-per-step {args.prompts_per_step} is not a multiple of "
         f"--mini-batch-prompts {args.mini_batch_prompts}")
    need(args.mini_batch_prompts % world_size == 0,
         f"--mini-batch-prompts {args.mini_batch_prompts} does not divide over {world_size} ranks "
         "(each rank owns whole groups)")
    need(args.device in ("auto", "cpu") or args.device.startswith("cuda"),
         f"--device {args.device!r}: auto, cpu or cuda")
    need(not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device}: no CUDA device visible")
    need(not args.fsdp or dist.is_available(), "--fsdp: this torch build has no torch.distributed")
    need(args.dist_timeout > 0, f"--dist-timeout {args.dist_timeout}: must be > 0 minutes")
    need(0 < args.warm_target <= 1, f"--warm-target {args.warm_target}: must be in (0, 1]")
    need(not args.demo or (world_size == 1 and evaluate.BENCHES[args.task].source == "synthetic"),
         "--demo runs in one process on a synthetic task (add or chain), whose rows carry the target `solution`")
    for flag, path in (("--data", args.data), ("--val-data", args.val_data)):
        need(path is None or os.path.isfile(path), f"{flag} {path!r}: no such file")
    try:
        evaluate.check_hub_model(args.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    model_dir = args.model != "tiny" and os.path.isdir(args.model)
    need(not model_dir or os.path.isfile(os.path.join(args.model, "config.json")),
         f"--model {args.model}: the directory has no config.json (not a saved model)")
    need(not args.resume_override or args.resume, "--resume-override applies to --resume only")
    need(not os.path.isfile(args.out), f"--out {args.out}: a file, not a directory")
    holds_run = os.path.exists(os.path.join(args.out, "metrics.jsonl")) or bool(checkpoint_dirs(args.out))
    need(not holds_run or args.resume or args.overwrite,
         f"--out {args.out} already holds a run: pass --resume to continue it, --overwrite, or another --out")


# ==============================================================================================
# 9. Distributed setup, precision, model modes


@dataclass
class Worker:
    """This process in the torchrun group: its rank, the number of ranks, and its device."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def checked_and_joined(args: Args, worker: Worker | None = None) -> Worker:
    """`check_args`, then the process group (`setup_distributed`) unless `worker` is given. The checks come first,
    with the world size torchrun puts in the environment: a bad flag is one line, whatever it would break
    in the setup (`--device cuda` without CUDA)."""
    check_args(args, worker.world_size if worker else int(os.environ.get("WORLD_SIZE", 1)))
    return worker or setup_distributed(args.device, args.dist_timeout)


def setup_distributed(device: str = "auto", timeout_minutes: float = 60.0) -> Worker:
    """This process's rank, world size and device; under torchrun it joins the process group
    (`rollout.setup_device`)."""
    if timeout_minutes <= 0:
        raise UserError(f"--dist-timeout {timeout_minutes}: must be > 0 minutes")
    try:
        dev = rollout.setup_device(device, timeout_minutes)
    except ValueError as e:
        raise UserError(str(e)) from None
    return Worker(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), dev)


def print0(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) of a [b, T, ...] tensor, right-padding T with zeros."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    T = all_reduce(torch.tensor([x.shape[1]], device=x.device), dist.ReduceOp.MAX).item()
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, T - x.shape[1]))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unwrap(model):
    """The Hugging Face model inside DDP (FSDP2 changes the model's class in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_model(model, worker: Worker, fsdp: bool, compute_dtype: torch.dtype, trainable: bool = True):
    """FSDP2 (each decoder layer, then the root; bf16 compute, fp32 reduce) or DDP (more than one rank).

    FSDP2 takes a model with meta or real parameters (`place_model` materialises after it). DDP takes
    real ones that already agree on every rank (`place_model` broadcast them), so it skips its own
    broadcast; its gradients live in its all-reduce buckets (gradient_as_bucket_view: no second copy).
    The policy's root stays unsharded from forward to backward (the backward needs it at once); a frozen
    model's root reshards after each forward.
    """
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(worker.device.type, (worker.world_size,))  # explicit: gloo on CPU where CUDA exists
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not trainable)
        return model
    if worker.world_size > 1 and trainable:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[worker.device.index] if worker.device.type == "cuda" else None, init_sync=False,
            gradient_as_bucket_view=True)
    return model


def autocast(model, worker: Worker, compute_dtype: torch.dtype):
    """bf16 autocast over fp32 weights (DDP / one process); FSDP2 casts by its MixedPrecisionPolicy."""
    if compute_dtype == torch.float32 or _fsdp_modules(model):
        return contextlib.nullcontext()
    return torch.autocast(worker.device.type, dtype=compute_dtype)


@contextlib.contextmanager
def sampling_mode(model):
    """Eval mode for sampling and validation; under FSDP2 every module unsharded until the block ends.

    rollout.sample drops finished rows, so ranks run different numbers of forward calls; with the
    parameters already gathered (and not resharded after each forward) no collective runs inside it.
    Eval mode also switches gradient checkpointing off (transformers applies it only in training).
    """
    policy = unwrap(model)
    policy.eval()
    fsdp = _fsdp_modules(policy)
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield policy
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not policy, recurse=False)  # as wrap_model set them
        if fsdp and hasattr(policy, "reset_iter_state"):  # forget the sampling forwards' order (ranks differ in it),
            policy.reset_iter_state()                      # which FSDP would otherwise use to prefetch in backward
        policy.train()


def grad_sync(model, enabled: bool):
    """Gradient all-reduce only on a mini-batch's last micro-batch (DDP no_sync / FSDP2's flag)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if _fsdp_modules(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def _sync(worker: Worker):
    if worker.device.type == "cuda":
        torch.cuda.synchronize(worker.device)


def peak_memory_gb(worker: Worker) -> float:
    """Peak accelerator memory since the last call (CUDA), or the process's peak RSS (CPU)."""
    if worker.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(worker.device) / 2**30
        torch.cuda.reset_peak_memory_stats(worker.device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ==============================================================================================
# 10. Models: read once on rank 0, built on the meta device everywhere, placed, then filled


def load_models(args: Args, worker: Worker, compute_dtype: torch.dtype, ckpt: str | None, model=None, tokenizer=None):
    """(policy, frozen reference or None, tokenizer), both models placed and wrapped on every rank.

    Rank 0 alone reads weights, once, into CPU memory: the initial model's state dict, which fills the
    policy on a fresh start and the reference. The other ranks never hold a full copy in CPU memory.
    On --resume the policy's values come from the checkpoint's sharded state (`load_training_state`).
    A `model` given (the benchmark's random shapes, built alike on every rank) is used as it is.
    """
    if model is not None:
        ref = (place_model(copy.deepcopy(model), worker, args, compute_dtype, None, load=False, trainable=False)
               if args.kl_coef else None)
        return place_model(model, worker, args, compute_dtype, None, load=False, trainable=True), ref, tokenizer
    initial = None
    if worker.rank == 0 and (ckpt is None or args.kl_coef > 0):
        initial = rollout.load_model_and_tokenizer(args.model, device="cpu", dtype=torch.float32,
                                                   tiny_hidden=args.tiny_hidden, tiny_layers=args.tiny_layers,
                                                   seed=args.seed)[0].state_dict()
    if dist.is_initialized():
        dist.barrier()  # a hub model is in the local cache now; the other ranks read its config and tokenizer
    tokenizer = load_tokenizer(ckpt or args.model)
    policy = place_model(skeleton(ckpt or args.model, args, tokenizer), worker, args, compute_dtype,
                         initial, load=ckpt is None, trainable=True)
    ref = None
    if args.kl_coef > 0:  # the frozen reference: the initial model, never a checkpoint
        ref = place_model(skeleton(args.model, args, tokenizer), worker, args, compute_dtype, initial, load=True,
                          trainable=False)
    return policy, ref, tokenizer


def load_tokenizer(source: str):
    """The tokenizer of `tiny`, a directory or a hub id, left-padding, with a pad token."""
    if source == "tiny":
        return rollout.build_tiny_tokenizer()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no initialisation) and
    their buffers as usual (rotary frequencies are computed, not loaded: no state dict has them)."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)  # an already-meta parameter (a tied one) is registered as it is

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton(source: str, args: Args, tokenizer):
    """The model `source` names (tiny, a directory, a hub id), fp32, with its parameters on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    with parameters_on_meta():
        if source == "tiny":
            return rollout.build_tiny_model(tokenizer, args.tiny_hidden, args.tiny_layers, seed=args.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    with contextlib.suppress(OSError):  # its generation EOS ids (Qwen3 ends on two), as from_pretrained reads them
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model


def place_model(model, worker: Worker, args: Args, compute_dtype: torch.dtype, full_state: dict | None, *,
                load: bool, trainable: bool):
    """A model (meta parameters from `skeleton`, or real ones) -> this rank's parameters on worker.device,
    sharded (FSDP2) or whole, wrapped. With `load` (the same on every rank), the values of rank 0's
    `full_state`: the other ranks receive them by broadcast, and their `full_state` is not read. A
    frozen model goes to eval mode without gradients; the policy gets gradient checkpointing
    (--grad-ckpt) and training mode."""
    if not trainable:
        model.requires_grad_(False).eval()
    elif args.grad_ckpt:  # active only in training mode, i.e. in the update (see the module docstring)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if args.fsdp:
        model = wrap_model(model, worker, True, compute_dtype, trainable)
    materialize_(model, worker.device)
    if load:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        if dist.is_initialized():
            set_model_state_dict(model, dict(full_state) if worker.rank == 0 else {},  # a copy: it replaces the entries
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            model.load_state_dict(full_state)
    if not args.fsdp:
        model = wrap_model(model, worker, False, compute_dtype, trainable)
    return model.train() if trainable else model


def materialize_(model, device: torch.device) -> None:
    """Meta parameters -> uninitialised ones on `device` (their values come next), keeping the buffers the
    constructor computed and tied parameters tied; a model with real parameters is moved to `device`."""
    if not any(p.device.type == "meta" for p in model.parameters()):
        model.to(device)
        return
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # swap contents in place: a tied Parameter stays one
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def make_critic(args: Args, worker: Worker, compute_dtype: torch.dtype, policy, ckpt: str | None):
    """(critic, its AdamW) for --method ppo, fresh from the policy or restored from `ckpt`; (None, None) otherwise."""
    if args.method != "ppo":
        return None, None
    critic = load_critic(args, worker, compute_dtype, policy, fresh=ckpt is None)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
    if ckpt is not None:
        load_critic_state(ckpt, critic, optimizer)
    return critic, optimizer


def load_critic(args: Args, worker: Worker, compute_dtype: torch.dtype, policy, fresh: bool):
    """--method ppo's critic (SPEC 9), placed and wrapped as the policy (DDP or FSDP2, gradient checkpointing):
    the policy's architecture as a token-classification model, i.e. its backbone with a value head
    Linear(hidden, 1) instead of the LM head, so the value forward never makes [T, V] logits. Fresh
    (`fresh`, before any update): the backbone is the policy's initial weights, gathered to rank 0 and
    broadcast; the head is drawn N(0, initializer_range) from --seed with bias 0 (transformers' init).
    On --resume its values come from the checkpoint (`load_critic_state`)."""
    from transformers import AutoModelForTokenClassification
    config = copy.deepcopy(unwrap(policy).config)
    config.num_labels, config.classifier_dropout, config.tie_word_embeddings = 1, 0.0, False
    config.architectures = None
    with parameters_on_meta():
        critic = AutoModelForTokenClassification.from_config(config, dtype=torch.float32)
    state = None
    if fresh:
        if dist.is_initialized():  # full weights on rank 0 only (FSDP2 gathers them; DDP has them)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            full = {k: v.detach().cpu() for k, v in unwrap(policy).state_dict().items()}
        if worker.rank == 0:
            g = torch.Generator().manual_seed(args.seed)
            head = torch.randn((1, config.hidden_size), generator=g) * config.initializer_range  # [1, H]
            state = {k: v for k, v in full.items() if not k.startswith("lm_head.")}
            state.update({"score.weight": head, "score.bias": torch.zeros(1)})
        del full
    return place_model(critic, worker, args, compute_dtype, state, load=fresh, trainable=True)


# ==============================================================================================
# 11. Checkpoints: atomic, complete (model, optimizer, RNG, step, data position), resumable, sharded


COMPLETE = "COMPLETE.json"  # written last into a checkpoint: its step and every file's size


def checkpoint_dirs(out: str) -> list[str]:
    """OUT's checkpoint directories ckpt-NNNNNN, newest step first (unfinished .tmp writes left out)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    steps = sorted((int(n[5:]), n) for n in names if re.fullmatch(r"ckpt-\d+", n))
    return [os.path.join(out, n) for _, n in reversed(steps)]


def checkpoint_files(path: str) -> dict[str, int]:
    """{relative path: size in bytes} of every file under a checkpoint directory, at any depth, but COMPLETE.json
    (so whatever a method adds to a checkpoint, a critic's files say, is covered)."""
    files = {}
    for root, _, names in os.walk(path):
        for n in names:
            full = os.path.join(root, n)
            rel = os.path.relpath(full, path)
            if rel not in (COMPLETE, COMPLETE + ".tmp"):
                files[rel] = os.path.getsize(full)
    return dict(sorted(files.items()))


def seal_checkpoint(path: str, step: int) -> None:
    """Write path/COMPLETE.json (the step and every file's size) atomically; call once every file is written."""
    with open(os.path.join(path, COMPLETE + ".tmp"), "w") as f:
        json.dump({"step": step, "files": checkpoint_files(path)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(path, COMPLETE + ".tmp"), os.path.join(path, COMPLETE))


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None: it was not sealed (killed mid-write), a file
    it was sealed with is missing or has another size (truncated, replaced), or trainer_state.json is unreadable
    or of another step."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            seal = json.load(f)
        step, files = int(seal["step"]), dict(seal["files"])
    except FileNotFoundError:
        return f"no {COMPLETE}: its write did not finish"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{COMPLETE} unreadable ({type(e).__name__}: {e})"
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} when written"
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state_step = json.load(f)["step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json unreadable ({type(e).__name__}: {e})"
    if state_step != step:
        return f"trainer_state.json is of step {state_step}, {COMPLETE} of step {step}"
    return None


def latest_checkpoint(out: str) -> str | None:
    """OUT's newest complete checkpoint (`checkpoint_problem` finds nothing), or None."""
    return next((p for p in checkpoint_dirs(out) if checkpoint_problem(p) is None), None)


def resumable_checkpoints(out: str) -> list[str]:
    """OUT's complete checkpoints, newest first, each incomplete one reported as `skipped PATH: why`. A UserError
    when OUT holds a run (metrics.jsonl, a checkpoint) but no complete checkpoint; [] when it holds no run."""
    good = []
    for path in checkpoint_dirs(out):
        problem = checkpoint_problem(path)
        if problem:
            print0(f"skipped {path}: {problem}")
        else:
            good.append(path)
    found = [n for n in ("metrics.jsonl", "samples.jsonl") if os.path.exists(os.path.join(out, n))] + \
        sorted(n for n in (os.listdir(out) if os.path.isdir(out) else []) if n.startswith("ckpt-"))
    if not good and found:
        raise UserError(f"--resume: {out} holds a run ({', '.join(found)}) but no complete checkpoint to resume from; "
                        "nothing was changed. Start it afresh with --overwrite (that deletes it), or use another --out")
    return good


def save_checkpoint(out: str, step: int, model, optimizer, tokenizer, state: dict, worker: Worker, keep_last: int,
                    critic: tuple | None = None) -> str:
    """Write OUT/ckpt-{step} (the layout is in the module docstring). Every rank must call it: the sharded
    state and the export's gathers are collectives. The one place that writes checkpoints. `critic`:
    (model, optimizer) of --method ppo, written to critic/ inside the same directory (`save_critic`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    name = f"ckpt-{step:06d}"
    final, tmp = os.path.join(out, name), os.path.join(out, name + ".tmp")
    if worker.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    os.makedirs(tmp, exist_ok=True)  # other nodes' view, when OUT is not on a shared filesystem
    # resumable state: each rank writes its own shards (FSDP2), or one copy of the replicas (DDP)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(tmp, "state"),
             no_dist=not dist.is_initialized())
    export_pretrained(model, tokenizer, tmp, worker)
    if critic is not None:
        save_critic(os.path.join(tmp, "critic"), *critic, tokenizer, worker)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if worker.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(worker.device)
    torch.save(rng, os.path.join(tmp, f"rng-rank{worker.rank}.pt"))
    if worker.rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
    if dist.is_initialized():
        dist.barrier()  # every rank's files are written
    if worker.rank == 0:
        seal_checkpoint(tmp, step)  # last: a checkpoint without it is one whose write did not finish
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out, "latest.tmp"), "w") as f:  # for people and scripts; --resume does not need it
            f.write(name)
        os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
        prune_checkpoints(out, step, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return final


def prune_checkpoints(out: str, step: int, keep_last: int) -> None:
    """After ckpt-{step} is sealed: keep it and the newest keep_last - 1 complete checkpoints before it; delete
    the other earlier ones and earlier unfinished writes. Later ones (left by a run resumed from an older
    checkpoint because a newer one failed) are not touched: the run will replace them when it gets there."""
    earlier = [p for p in checkpoint_dirs(out) if int(os.path.basename(p)[5:]) < step]
    keep = [p for p in earlier if checkpoint_problem(p) is None][:keep_last - 1]
    stale = [os.path.join(out, n) for n in os.listdir(out) if re.fullmatch(r"ckpt-\d+\.tmp", n) and int(n[5:-4]) < step]
    for p in [p for p in earlier if p not in keep] + stale:
        shutil.rmtree(p, ignore_errors=True)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def export_pretrained(model, tokenizer, path: str, worker: Worker) -> None:
    """path/model.safetensors, config.json, generation_config.json and the tokenizer: what `from_pretrained`
    and `--model` read. Rank 0 writes the safetensors header (every shape is known in advance), then one
    tensor at a time; under FSDP2 each is all-gathered from its shards just before it is written (every
    rank takes part), so no rank ever holds the whole model. A tied weight is written once, under its
    first name (save_pretrained's layout: Qwen3's lm_head.weight is model.embed_tokens.weight)."""
    hf = unwrap(model)
    persistent = set(hf.state_dict())  # under FSDP2 this holds shards: nothing is gathered
    tensors = list(hf.named_parameters()) + [(n, b) for n, b in hf.named_buffers() if n in persistent]
    header, offset = {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads its header to 8 bytes
    with open(os.path.join(path, "model.safetensors"), "wb") if worker.rank == 0 else contextlib.nullcontext() as f:
        if f:
            f.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in tensors:
            full = t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective under FSDP2
            if f:
                f.write(full.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
            del full
    if worker.rank == 0:
        config = copy.deepcopy(hf.config)
        config.dtype = torch.float32  # the master weights' dtype, which the file holds
        config.save_pretrained(path)
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.save_pretrained(path)
        tokenizer.save_pretrained(path)


def load_training_state(ckpt: str, model, optimizer, worker: Worker) -> dict:
    """Model and optimizer from the checkpoint's sharded state (any world size), this rank's RNG, and
    trainer_state.json."""
    state_dir = os.path.join(ckpt, "state")
    if not os.path.isdir(state_dir):
        raise UserError(f"--resume: {ckpt} has no sharded training state (state/); an older train.py wrote it")
    load_sharded(state_dir, model, optimizer)
    rng_file = os.path.join(ckpt, f"rng-rank{worker.rank}.pt")
    if os.path.exists(rng_file):  # a different world size resumes with fresh RNG (sampling seeds are explicit)
        rng = torch.load(rng_file, weights_only=True)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and worker.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], worker.device)
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        return json.load(f)


def save_critic(path: str, critic, optimizer, tokenizer, worker: Worker) -> None:
    """CKPT/critic/: state/ (the critic and its AdamW, sharded as the policy's) and the critic exported like
    the policy (`AutoModelForTokenClassification.from_pretrained` loads it). Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    os.makedirs(path, exist_ok=True)
    model_sd, optim_sd = get_state_dict(critic, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(path, "state"),
             no_dist=not dist.is_initialized())
    export_pretrained(critic, tokenizer, path, worker)


def load_critic_state(ckpt: str, critic, optimizer) -> None:
    """The critic and its AdamW from CKPT/critic/state (any world size), as `load_training_state` does the policy."""
    state_dir = os.path.join(ckpt, "critic", "state")
    if not os.path.isdir(state_dir):
        raise UserError(f"--resume --method ppo: {ckpt} has no critic (critic/state/); it was not a ppo run")
    load_sharded(state_dir, critic, optimizer)


def load_sharded(state_dir: str, model, optimizer) -> None:
    """A model and its optimizer from a torch.distributed.checkpoint directory, resharded to this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)  # the layout to read into
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=state_dir, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


STOP = {"requested": False}


def _request_stop(signum, frame):
    """SIGTERM / Ctrl-C: finish the step, save, exit. A second Ctrl-C quits at once."""
    if STOP["requested"] and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP["requested"] = True
    print(f"[rank {os.environ.get('RANK', 0)}] {signal.Signals(signum).name}: finishing this step, saving, exiting",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_requested_by_signals():
    """While training, SIGTERM and Ctrl-C request a stop (`_request_stop`); the old handlers afterwards."""
    old = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    STOP["requested"] = False
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ==============================================================================================
# 12. Logs and plots


def read_metrics(run_dir: str) -> list[dict]:
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines log. A last line without its newline is a torn append (the disk filled, the
    process died mid-write) and is skipped; a bad line elsewhere is a UserError naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")  # the last element: b"" after a whole last line, else the torn tail
    rows = []
    for i, line in enumerate(lines[:-1], 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"{path}: line {i}: not a JSON row ({e})") from None
    return rows


def plot_runs(run_dirs: list[str], out_png: str, labels: list[str] | None = None) -> str:
    """Reward and validation accuracy against step and against wall-clock seconds, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for i, run in enumerate(run_dirs):
        rows = read_metrics(run)
        label = labels[i] if labels else os.path.basename(os.path.normpath(run))
        tr = [r for r in rows if "reward_mean" in r]
        ema, smooth = None, []  # reward is noisy: an exponential moving average (0.9) is drawn
        for r in tr:
            ema = r["reward_mean"] if ema is None else 0.9 * ema + 0.1 * r["reward_mean"]
            smooth.append(ema)
        va = [r for r in rows if r.get("val_acc") is not None]
        for col, x in enumerate(("step", "wall_s")):
            line, = ax[0, col].plot([r[x] for r in tr], smooth, label=label)
            ax[1, col].plot([r[x] for r in va], [r["val_acc"] for r in va], "o-", color=line.get_color(), label=label)
    for col, x in enumerate(("step", "wall-clock seconds")):
        ax[0, col].set(title=f"training reward (EMA 0.9) vs {x}", xlabel=x)
        ax[1, col].set(title=f"validation accuracy (greedy) vs {x}", xlabel=x)
    ax[0, 0].set_ylabel("reward")
    ax[1, 0].set_ylabel("accuracy")
    ax[0, 0].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _append_jsonl(path: str, row: dict) -> None:
    """Append one row as one write. A torn last line (an earlier append cut short) is cut off first, so the
    new row starts a line of its own and the file reads whole again."""
    line = (json.dumps(row) + "\n").encode()
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end and (f.seek(end - 1), f.read(1))[1] != b"\n":
            f.truncate(_last_newline_end(f, end))
        f.write(line)


def _last_newline_end(f, end: int, block: int = 1 << 16) -> int:
    """The offset just after the last newline before `end` in the open binary file `f` (0 if there is none),
    read backwards a block at a time (a samples row can be long)."""
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        k = f.read(pos - start).rfind(b"\n")
        if k >= 0:
            return start + k + 1
        pos = start
    return 0


# ==============================================================================================
# 13. The offline demo: a supervised warm start, then RL


def supervised_warm_start(model, tokenizer, task: str, examples: list[dict], *, steps: int, batch_size: int,
                          lr: float, seed: int = 0, target: float | None = None, check_every: int = 50,
                          check_examples: list[dict] | None = None) -> tuple[int, float, float | None]:
    """Cross-entropy on the target completion (`solution` + EOS) given the prompt: the demo's starting point,
    a model with partial accuracy for RL to improve. With `target`, stops once greedy accuracy on
    `check_examples` reaches it (the tiny model's accuracy jumps within a few hundred steps, at a step that
    varies with seed and machine, so a fixed step count would start RL from 5% or from 60%).
    Returns (steps done, last loss, last accuracy checked or None)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pairs = [(evaluate.prompt_ids(task, ex, tokenizer),
              tokenizer.encode(ex["solution"], add_special_tokens=False) + [eos]) for ex in examples]
    check_tokens = max(len(a) for _, a in pairs)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    loss, acc, done = torch.tensor(float("nan")), None, 0
    for done in range(1, steps + 1):
        chosen = [pairs[i] for i in torch.randint(len(pairs), (batch_size,), generator=g).tolist()]
        Tp, Ta = max(len(q) for q, _ in chosen), max(len(a) for _, a in chosen)
        ids = torch.full((batch_size, Tp + Ta), pad)  # [b, Tp + Ta]: prompt left-padded, answer right-padded
        labels = torch.full_like(ids, -100)  # loss on the answer tokens only
        attn = torch.zeros_like(ids)
        for row, (q, a) in enumerate(chosen):
            ids[row, Tp - len(q):Tp] = torch.tensor(q)
            ids[row, Tp:Tp + len(a)] = labels[row, Tp:Tp + len(a)] = torch.tensor(a)
            attn[row, Tp - len(q):Tp + len(a)] = 1
        logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if target is not None and done % check_every == 0:
            # room for the longest target: a shorter cut (chain's solutions run to 32 tokens) scores a
            # correct answer as wrong, so the target is never met and every warm step runs
            acc = evaluate.evaluate(model, tokenizer, task, check_examples, max_new_tokens=check_tokens,
                                    batch_size=200, progress=False)[0]["accuracy"]
            if acc >= target:
                break
    model.eval()
    return done, float(loss.detach()), acc


def warm_start(args: Args) -> str:
    """The demo's warm-started model directory (--warm-dir, default OUT/warm-start), trained unless a
    model from the same recipe is cached there; written to a temporary directory and renamed."""
    warm = args.warm_dir or os.path.join(args.out, "warm-start")
    recipe = dict(task=args.task, hidden=args.tiny_hidden, layers=args.tiny_layers, steps=args.warm_steps,
                  target=args.warm_target, batch=args.warm_batch, lr=args.warm_lr, seed=args.seed,
                  train_limit=args.train_limit, check="longest-target")  # check: v1 cut answers at 16 tokens
    try:
        with open(os.path.join(warm, "warm_start.json")) as f:
            if json.load(f) == recipe:
                return warm
    except FileNotFoundError:
        pass
    t = time.time()
    tokenizer = rollout.build_tiny_tokenizer()
    model = rollout.build_tiny_model(tokenizer, args.tiny_hidden, args.tiny_layers, seed=args.seed)
    examples = evaluate.load_examples(args.task, "train", limit=args.train_limit, seed=args.seed)
    print0(f"supervised warm start on {args.task} (batch {args.warm_batch}, lr {args.warm_lr}) until greedy "
           f"accuracy {args.warm_target} on 200 training prompts ...")
    steps, loss, acc = supervised_warm_start(
        model, tokenizer, args.task, examples, steps=args.warm_steps, batch_size=args.warm_batch, lr=args.warm_lr,
        seed=args.seed, target=args.warm_target, check_examples=examples[:200])
    tmp = warm.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "warm_start.json"), "w") as f:
        json.dump({**recipe}, f)
    shutil.rmtree(warm, ignore_errors=True)
    os.replace(tmp, warm)
    print0(f"warm start: {steps} steps in {time.time() - t:.0f} s, loss {loss:.3f}, training accuracy {acc}; "
           f"saved to {warm}")
    return warm


def demo(args: Args, worker: Worker | None = None) -> dict:
    """`python train.py --demo`: tiny Qwen3 + character tokenizer, a supervised warm start on the
    synthetic task to partial accuracy (cached), RL with --method, greedy accuracy before and after,
    and the plot. Everything offline, a few minutes on 2 CPU cores."""
    worker = checked_and_joined(args, worker)
    rl = dataclasses.replace(args, model=warm_start(args), demo=False)
    t = time.time()
    result = train(rl, worker)
    (s0, before), (s1, after) = result["val_acc"][0], result["val_acc"][-1]
    print0(f"{args.method}: greedy accuracy on {args.val_limit} {args.task} test prompts: {before:.3f} at step {s0} "
           f"-> {after:.3f} at step {s1} ({after - before:+.3f}) in {time.time() - t:.0f} s of RL")
    return {**result, "before": before, "after": after}


def main(argv: list[str] | None = None):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars beside ours
    # one process saves its checkpoint alone on purpose; torch.distributed.checkpoint warns about it at every save
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    args = parse_args(argv)
    if args.demo:
        return demo(args)
    return train(args)


def cli(argv: list[str] | None = None) -> int:
    """`python train.py ...`: main, with a user error or a stopped run as one line on stderr; the exit code."""
    code = 0
    try:
        main(argv)
    except UserError as e:  # the user's to fix: one line naming the flag or file, argparse's exit code
        if int(os.environ.get("RANK", 0)) == 0:  # every rank finds the same error: rank 0 says it, once
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(10)  # so that rank 0 exits first: torchrun then stops this rank and reports rank 0's exit
        code = 2
    except StopRun as e:  # not a bug: the run cannot go on, and the message says why (a traceback adds nothing)
        print(f"train.py: stopped: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
