"""train.py: one RL loop for GRPO, Dr. GRPO, TEMPO, TreeAdv, HEPO and PPO on Qwen3 (torchrun: DDP or FSDP2).

README's SPEC sections, as computed here: SPEC 6, the one policy loss (PPO-clip 0.2 / 0.28, dual clip 3, a
token mean over the whole mini-batch on every rank, so no result depends on the number of GPUs or the
micro-batch split; Dr. GRPO's constant divisor under `--scale none`; optional k3 KL to the initial model);
SPEC 5, TreeAdv's GSPO objective (`--objective gspo`, or `gspo-paper` as published) and unique segments;
SPEC 9, PPO with a critic trained by the same update loop; SPEC 7, the paper's setup as the defaults.
Read it top to bottom: the loss, one update, one RL step (rollout -> reward -> advantages -> update -> log),
the loop; below the banner, the infrastructure (flags, ranks, models, checkpoints, logs, the demo).

Departures: dual clip also applies to the GSPO-token ratio (SPEC 6's loss is shared); warmup counts RL steps;
the critic's lr is 10x the policy's (SPEC 9: 1e-5 beside 1e-6); `--shuffle-rewards` is a control of ours.

Run:
    python train.py --demo                                   # offline CPU demo: warm start, then RL (minutes)
    torchrun --nproc_per_node 8 train.py --method tempo      # the paper's setup (downloads Qwen3-1.7B, MATH)
    torchrun --nproc_per_node 2 train.py --device cpu --model tiny --task add --steps 2 --prompts-per-step 4 \\
        --mini-batch-prompts 4 --max-new-tokens 8 --out runs/cpu-ddp --resume   # gloo on CPU (--fsdp: FSDP2)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

import advantages
import evaluate
import rollout

METHODS = ("grpo", "tempo", "treeadv", "hepo", "ppo", "treeadv-centred", "treerl", "treepo", "spo")
OBJECTIVES = ("grpo", "gspo", "gspo-paper")
CLIP_LOW, CLIP_HIGH, DUAL_CLIP = 0.2, 0.28, 3.0  # SPEC 6: DAPO's clip-higher, dual clip c = 3
GSPO_PAPER_CLIP = (3e-4, 4e-4)                    # GSPO as published (and as verl runs it), no dual clip
KL_LOG_RATIO_BOUND, KL_BOUND = 20.0, 10.0         # verl's k3 bounds (see k3_kl)
VALUE_CLIP, CRITIC_LR_FACTOR = 0.5, 10.0          # SPEC 9
GRAD_CLIP, WEIGHT_DECAY, MAX_NONFINITE = 1.0, 0.01, 3
TRAIN_PROMPTS, MAX_PROMPT_TOKENS = 1000, 1024     # SPEC 7: 1,000 training prompts (hub tasks), longer ones dropped
LOGIT_CHUNK = 1024                                # token positions whose logits exist at once in the update


class UserError(ValueError):
    """A problem with the flags, the data files or the run directory: `train.py: error: ...`, one line, exit 2."""


class StopRun(Exception):
    """The run cannot go on (non-finite weights, a lost rank): one line, exit 1; the last checkpoint stands."""


# ALGO LOGIC 1. The policy loss (SPEC 6): small pure functions on [b, T] tensors. Padding may hold any number (a
#    pad token's log-prob can be -1e4): every function masks before an exponential.


def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, gspo: bool = False) -> torch.Tensor:
    """The ratio per token, [b, T] (1 at padding): r_{i,t} = exp(log pi - log pi_old); or GSPO-token's
    s_{i,t} = sg[s_i] pi(o_t) / sg[pi(o_t)], s_i = exp(mean_t (log pi - log pi_old)) over row i's valid tokens (value
    s_i, gradient s_i grad log pi). Under unique segments a shared token's copies carry their own rows' s_i."""
    log_r = torch.where(mask, logp - old_logp, 0.0)  # [b, T]
    if not gspo:
        return torch.exp(log_r)
    log_s = log_r.sum(-1) / mask.sum(-1).clamp(min=1)  # [b]
    return torch.exp(log_s.detach()[:, None] + torch.where(mask, logp - logp.detach(), 0.0))


def ppo_clip_loss(ratio: torch.Tensor, A: torch.Tensor, clip_low: float = CLIP_LOW, clip_high: float = CLIP_HIGH,
                  dual_clip: float = DUAL_CLIP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), and for A < 0 (dual clip, c > 1) min(l, -c A), which
    bounds the loss when r >> 1. Returns (l, clipped, dual_clipped), the masks where no gradient passes."""
    unclipped, clipped = -A * ratio, -A * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    is_dual = (A < 0) & (loss > -dual_clip * A) if dual_clip else torch.zeros_like(A, dtype=torch.bool)
    return torch.where(is_dual, -dual_clip * A, loss), clipped > unclipped, is_dual


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref) per token: exp(d) - d - 1, d = log pi_ref - log pi, 0 off `mask`; verl's
    bounds (d to +-20, k3 to 10), else one token the policy made nearly impossible under the reference adds e^20
    to the loss, and gradient clipping turns that into a step that ignores every other token."""
    d = torch.where(mask, ref_logp - logp, 0.0).clamp(-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    return (torch.exp(d) - d - 1).clamp(max=KL_BOUND)


def loss_agg(args: Args) -> str:
    """GSPO's sequence mean of token means (gspo-paper), Dr. GRPO's constant (--scale none), else the token mean."""
    return "seq-mean" if args.objective == "gspo-paper" else "max-len" if args.scale == "none" else "token-mean"


def loss_normaliser(mask: torch.Tensor, weight: torch.Tensor, agg: str, max_len: int) -> torch.Tensor:
    """This rank's share of the divisor N (float64; summed over ranks): the valid tokens' weights (token-mean: their
    count, or the distinct tree tokens under unique segments), the rows (seq-mean), rows x max new tokens (max-len)."""
    if agg == "token-mean":
        return torch.where(mask, weight, 0.0).sum().double()
    rows = torch.tensor(float(mask.shape[0]), dtype=torch.float64, device=mask.device)
    return rows if agg == "seq-mean" else rows * max_len


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, agg: str,
              N: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss: sum_{i,t} w l / N (seq-mean: sum_i mean_t w l / N)."""
    wl = torch.where(mask, per_token * weight, 0.0)
    return ((wl.sum(-1) / mask.sum(-1).clamp(min=1)).sum() if agg == "seq-mean" else wl.sum()) / N


def policy_loss(logp, mb: dict, N: torch.Tensor, args: Args) -> tuple[torch.Tensor, dict]:
    """SPEC 6's loss of one micro-batch (`mb`: A, weight, old_logp, sampler_logp, response_mask, maybe ref_logp) and
    its statistics (device sums over valid tokens): tokens, clipped, dual_clipped, approx_kl (k3 to pi_old),
    kl_ref, gap (|log pi - the sampler's log-prob|), gap_max."""
    mask, paper = mb["response_mask"], args.objective == "gspo-paper"
    ratio = policy_ratio(logp, mb["old_logp"], mask, gspo=args.objective != "grpo")
    clip = GSPO_PAPER_CLIP if paper else (CLIP_LOW, CLIP_HIGH)
    per_token, clipped, dual = ppo_clip_loss(ratio, mb["A"], *clip, dual_clip=0.0 if paper else DUAL_CLIP)
    gap = torch.where(mask, (logp.detach() - mb["sampler_logp"]).abs(), 0.0)
    stats = dict(tokens=mask.sum(), clipped=(clipped & mask).sum(), dual_clipped=(dual & mask).sum(),
                 approx_kl=k3_kl(logp.detach(), mb["old_logp"], mask).sum(), gap=gap.sum(), gap_max=gap.max())
    if args.kl_coef > 0:
        kl = k3_kl(logp, mb["ref_logp"], mask)
        per_token = per_token + args.kl_coef * kl
        stats["kl_ref"] = torch.where(mask, kl.detach(), 0.0).sum()
    return aggregate(per_token, mask, mb["weight"], loss_agg(args), N), stats


def value_loss(values, mb: dict, N: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """SPEC 9's clipped value loss of one micro-batch, its share of the mini-batch's token mean:
    0.5 max((V - R)^2, (clip(V, V_old - 0.5, V_old + 0.5) - R)^2); statistics: tokens, value_clipped (`update`
    sums the loss itself)."""
    mask, R, old = mb["response_mask"], mb["returns"], mb["old_values"]
    # clamp with tensor bounds leaves V bit-exact inside the band, so `clipped` does not depend on the split
    plain, clipped = (values - R) ** 2, (values.clamp(min=old - VALUE_CLIP, max=old + VALUE_CLIP) - R) ** 2
    loss = aggregate(0.5 * torch.maximum(plain, clipped), mask, torch.ones_like(values), "token-mean", N)
    return loss, dict(tokens=mask.sum(), value_clipped=((clipped > plain) & mask).sum())


# ALGO LOGIC 2. Log-probs from the final hidden states: the LM head in token chunks, recomputed in the backward


class _HeadLogProb(torch.autograd.Function):
    """lp = log softmax(h W^T)[y] for N token positions, LOGIT_CHUNK at a time. Only h and W are saved, never
    logits; the backward recomputes each chunk's z = h W^T: dz = g (onehot(y) - softmax(z)), dh = dz W,
    dW = sum over chunks of dz^T h in fp32. Peak: a few [chunk, V] tensors and one [V, H] fp32 sum."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        lp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [N]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # [V, H]
            for s in range(0, hidden.shape[0], LOGIT_CHUNK):
                z = (hidden[s:s + LOGIT_CHUNK].to(dtype) @ w.t()).float()  # [n, V] fp32, in the head's rounding
                lp[s:s + LOGIT_CHUNK] = z.gather(1, targets[s:s + LOGIT_CHUNK, None]).squeeze(1) - z.logsumexp(1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.dtype = dtype
        return lp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        grad_h = torch.empty_like(hidden)  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, H]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for s in range(0, hidden.shape[0], LOGIT_CHUNK):
                h, g = hidden[s:s + LOGIT_CHUNK].to(ctx.dtype), grad[s:s + LOGIT_CHUNK, None].float()  # [n, H], [n, 1]
                dz = torch.softmax((h @ w.t()).float(), 1).mul_(-g)  # [n, V]
                dz = dz.scatter_add_(1, targets[s:s + LOGIT_CHUNK, None], g).to(ctx.dtype)
                grad_h[s:s + LOGIT_CHUNK] = dz @ w
                grad_w += dz.t() @ h
        return grad_h, grad_w.to(weight.dtype), None, None


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(y | s) = log_softmax(h W^T)[y], float32 [N], for hidden states h [N, H], an LM head W [V, H] and
    targets y [N], computed in the head's dtype (autocast's when on, else W's); the tests check value and grads."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return _HeadLogProb.apply(hidden, weight, targets, dtype)


@contextlib.contextmanager
def head_replaced(model, fn):
    """Inside the block the LM head computes fn(hidden_states, head), returned as `.logits`. Why not the backbone,
    then the head: the root's forward stays the one that runs, so FSDP2's hooks unshard and reduce the head."""
    head = unwrap(model).get_output_embeddings()
    head.forward = lambda hidden: fn(hidden, head)
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def response_logprobs(model, mb: dict, ctx) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of a packed micro-batch (`pack_rows`), [b, T] float32, 0 at padding; only the valid
    response tokens reach the head."""
    mask = mb["response_mask"]
    targets = mb["response_ids"][mask]  # [N] row-major

    def logprobs(hidden, head):  # [b, L, H] -> [N]
        return head_logprobs(hidden.flatten(0, 1)[mb["head_index"]], head.weight, targets)

    with ctx(), head_replaced(model, logprobs):
        lp = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"],
                   use_cache=False).logits
    return torch.zeros(mask.shape, device=lp.device).masked_scatter(mask, lp)


def response_values(critic, mb: dict, ctx) -> torch.Tensor:
    """V(s_t) of a packed micro-batch, [b, T] float32, 0 at padding: the value head on the state before token t."""
    with ctx():
        out = critic(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"],
                     use_cache=False).logits  # [b, L, 1]
    v = out.flatten(0, 1)[mb["head_index"], 0].float()  # [N]
    return torch.zeros(mb["response_mask"].shape, device=v.device).masked_scatter(mb["response_mask"], v)


@torch.no_grad()
def forward_rows(fn, batch: dict, args: Args) -> torch.Tensor:
    """fn (response_logprobs or _values of a model) over every row in micro-batches, [B, T]: old log-probs, V_old."""
    out = torch.zeros(batch["response_mask"].shape, device=batch["response_mask"].device)  # [B, T]
    for rows in micro_batches(batch, args):
        x = fn(pack_rows(batch, rows))
        out[torch.tensor(rows, device=out.device)[:, None], torch.arange(x.shape[1], device=out.device)] = x
    return out


# ALGO LOGIC 3. One update: mini-batches of whole groups, micro-batches by a token budget; one loop for the policy
#    and the critic (the loss passed in)


def update(model, optimizer, batch: dict, lr: float, args: Args, world: int, loss_fn, normaliser) -> dict:
    """One optimizer step per mini-batch (--mini-batch-prompts over all ranks, whole groups) of this rank's rows.
    The divisor N is the whole mini-batch's (`normaliser`, all-reduced), so each micro-batch's loss is its share
    and the gradients are summed: over micro-batches by accumulation, over ranks by DDP / FSDP2 (which average:
    hence x world). Then clip to norm 1 and step, unless the loss or the norm is not finite on some rank: skipped.
    Returns device statistics, sums (first_*: the first mini-batch's, taken before any step)."""
    rows, stats = args.mini_batch_prompts // world * args.group_size, {}
    for s in range(0, batch["response_mask"].shape[0], rows):
        mb = {k: v[s:s + rows] for k, v in batch.items()}
        N, plan, mb_loss = all_reduce(normaliser(mb)).clamp(min=1e-12), micro_batches(mb, args), 0.0
        for k, part in enumerate(plan):
            with grad_sync(model, k == len(plan) - 1):
                loss, st = loss_fn(model, pack_rows(mb, part), N)
                (loss * world).backward()
            mb_loss = mb_loss + loss.detach()
            add_stats(stats, {**st, **({"first_" + key: v for key, v in st.items()} if s == 0 else {})})
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        ok = all_reduce(torch.isfinite(mb_loss + norm).float().reshape(1), dist.ReduceOp.MIN).item()  # 1 sync
        if ok:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the same on every rank: each enters log_step's sum over ranks as its 1/world share
        add_stats(stats, dict(loss=mb_loss, grad_norm=norm / world, updates=torch.tensor(1.0 / world),
                              skipped=torch.tensor((1.0 - ok) / world)))
    return stats


def add_stats(total: dict, part: dict) -> None:
    """Accumulate device statistics: sums, and maxima for keys ending in _max."""
    for k, v in part.items():
        total[k] = torch.maximum(total[k], v) if k in total and k.endswith("_max") else total.get(k, 0) + v


def policy_step(args: Args, ctx):
    """The policy's (loss_fn, normaliser) for `update`; the critic's are value_loss and its token count."""
    return (lambda model, mb, N: policy_loss(response_logprobs(model, mb, ctx), mb, N, args),
            lambda mb: loss_normaliser(mb["response_mask"], mb["weight"], loss_agg(args), args.max_new_tokens))


def lr_at(step: int, args: Args) -> float:
    """Constant lr after a linear warmup over --warmup-steps RL steps (step counts from 0)."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


# ALGO LOGIC 4. One RL step: rollout -> reward -> advantages -> update -> log


def compute_advantages(args: Args, responses, mask, rewards, entropy, tree) -> torch.Tensor:
    """A [B, T] float32 for --method (not ppo), 0 at padding; `tree`: advantages.prefix_tree of these rows."""
    G, scale = args.group_size, args.scale
    if args.method == "grpo":
        return advantages.grpo_advantages(rewards, G, scale=scale)[:, None] * mask
    if args.method == "tempo":
        return advantages.tempo_advantages(responses, mask, rewards, G, td_weight=args.td_weight, scale=scale,
                                           tree=tree)
    if args.method in ("treeadv", "treeadv-centred"):
        return advantages.treeadv_advantages(responses, mask, rewards, G, scale=scale, tree=tree,
                                             centred=args.method == "treeadv-centred")
    if args.method in ("treerl", "treepo", "spo"):  # the field's other tree estimators: their own scales
        return getattr(advantages, f"{args.method}_advantages")(responses, mask, rewards, G, tree=tree)
    return advantages.hepo_advantages(entropy, mask, rewards, G, scale=scale)


def step_prompts(step: int, n: int, P: int, seed: int) -> list[int]:
    """The step's P prompt indices: passes over the n prompts, each in a fresh seeded order, the last incomplete
    batch of a pass dropped. A function of the step alone, so a resumed run draws what the straight one did."""
    p, k = divmod(step, n // P)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + p))[k * P:(k + 1) * P].tolist()


def sample_seed(seed: int, step: int) -> int:
    """The step's sampling seed, the same on every rank (prompts are told apart by their place in the step)."""
    return (seed * 1_000_003 + step) * 65_537


def rank_places(rank: int, world: int, P: int, M: int) -> list[int]:
    """The places 0..P-1 of the step's prompts that `rank` owns: its 1/world of each M-prompt mini-batch, so a
    mini-batch holds the same prompts on any number of ranks."""
    m = M // world
    return [k * M + rank * m + j for k in range(P // M) for j in range(m)]


def rollout_step(run: Run, step: int) -> tuple[rollout.Rollout, list[int]]:
    """This rank's share of the step's prompts, G responses each, keyed by their place in the step."""
    args, w = run.args, run.worker
    places = rank_places(w.rank, w.world_size, args.prompts_per_step, args.mini_batch_prompts)
    order = step_prompts(step, len(run.prompts), args.prompts_per_step, args.seed)  # once: a randperm of n
    idx = [order[p] for p in places]
    with sampling_mode(run.model) as policy, run.ctx():
        cfg = run.cfg  # on CUDA the budget is what free memory holds, AdamW's states still to come kept aside
        if cfg.kv_budget is None and w.device.type == "cuda":
            cfg = dataclasses.replace(cfg, kv_budget=rollout.default_kv_budget(
                policy, rows=len(idx) * args.group_size, optimizer=run.optimizer,
                longest=max(len(run.prompts[i]) for i in idx) + args.max_new_tokens))
        ro = rollout.sample(policy, [run.prompts[i] for i in idx], args.group_size, cfg, eos_token_ids=run.eos_ids,
                            pad_token_id=run.tokenizer.pad_token_id, seed=sample_seed(args.seed, step),
                            prompt_keys=places)
    return ro, idx


def reward_step(run: Run, ro: rollout.Rollout, idx: list[int]) -> tuple[torch.Tensor, dict, list[str]]:
    """evaluate.py's verifier: one reward per response, (rewards [B], counters, completions)."""
    texts, _ = evaluate.decode_responses(run.tokenizer, ro)
    rewards, counters = evaluate.score_batch(run.args.task, texts, [run.train_ex[i] for i in idx
                                                                    for _ in range(run.args.group_size)])
    return torch.tensor(rewards, device=ro.response_mask.device), counters, texts


def advantage_step(run: Run, ro: rollout.Rollout, r: torch.Tensor, step: int, values: torch.Tensor | None):
    """(A, token weights, returns or None: [B, T] each; SPEC 8 diagnostics) for this rank's rows, computed on the
    whole step's batch (every rank's groups, gathered), so batch statistics do not depend on the world size.
    PPO: GAE from the critic's `values`, whitened over every rank's valid tokens (SPEC 9)."""
    args, G, (B, T) = run.args, run.args.group_size, ro.response_mask.shape
    mine = slice(run.worker.rank * B, (run.worker.rank + 1) * B)  # this rank's rows: whole groups
    responses, r_all = gather_rows(ro.response_ids), gather_rows(r[:, None])[:, 0]
    mask = gather_rows(ro.response_mask)
    if args.shuffle_rewards:  # the control: rewards no longer belong to their responses
        r_all = r_all[torch.randperm(len(r_all), generator=torch.Generator().manual_seed(sample_seed(args.seed, step)))
                      .to(r_all.device)]
    tree = advantages.prefix_tree(responses, mask, G)  # SPEC 2, once: advantages, diagnostics, weights
    returns = None
    if args.method == "ppo":
        A_all, R_all = advantages.gae_advantages(r_all, gather_rows(values), mask)
        A, returns = advantages.whiten(A_all, mask)[mine, :T], R_all[mine, :T]
    else:
        entropy = gather_rows(ro.entropy) if args.method == "hepo" else None  # only HEPO reads it: no collective
        A = compute_advantages(args, responses, mask, r_all, entropy, tree)[mine, :T]
    weight = torch.ones_like(A)
    if args.unique_segments:  # SPEC 5b: the n copies of a shared token weigh 1/n each, so it trains once
        n = advantages.prefix_counts(ro.response_ids, ro.response_mask, G, tree=tree.rows(mine))
        weight = 1.0 / n.clamp(min=1).float()
    return A, weight, returns, advantages.branch_diagnostics(responses, mask, r_all, G, tree=tree)


def update_step(run: Run, ro: rollout.Rollout, A, weight, step: int, values, returns) -> dict:
    """Old log-probs (under bf16 recomputed by the update's own forward, whose rounding differs from the sampler's
    decode path; else the sampler's), the reference's; then the policy's update and the critic's."""
    args, world, rows = run.args, run.worker.world_size, rows_of(ro)
    batch = dict(rows, A=A, weight=weight, sampler_logp=ro.logprobs, old_logp=ro.logprobs)
    if run.dtype != torch.float32:
        batch["old_logp"] = forward_rows(lambda mb: response_logprobs(run.model, mb, run.ctx), batch, args)
    if run.ref is not None:
        batch["ref_logp"] = forward_rows(lambda mb: response_logprobs(run.ref, mb, run.ctx), batch, args)
    stats = update(run.model, run.optimizer, batch, lr_at(step, args), args, world, *policy_step(args, run.ctx))
    if run.critic is not None:
        cstats = update(run.critic, run.critic_optimizer, dict(rows, old_values=values, returns=returns),
                        CRITIC_LR_FACTOR * args.lr, args, world,
                        lambda critic, mb, N: value_loss(response_values(critic, mb, run.ctx), mb, N),
                        lambda mb: mb["response_mask"].sum().double())
        R, D = returns[ro.response_mask].double(), (returns - values)[ro.response_mask].double()
        cstats.update(ev_r=R.sum(), ev_r2=(R * R).sum(), ev_d=D.sum(), ev_d2=(D * D).sum())  # explained variance
        stats.update({"critic_" + k: v for k, v in cstats.items()})
    return stats


def rows_of(ro: rollout.Rollout) -> dict:
    return {k: getattr(ro, k) for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}


def log_step(run: Run, step: int, ro: rollout.Rollout, r, counters: dict, A, diag: dict, stats: dict,
             times: dict) -> dict:
    """The step's metrics row: sums over every rank in one all-reduce (maxima in another), brought to the host
    once, then ratios. It also carries any rank's stop request (SIGTERM) to every rank."""
    mask = ro.response_mask
    sums = dict(reward=r.sum(), rows=mask.shape[0], entropy=(ro.entropy * mask).sum(), truncated=(~ro.finished).sum(),
                decoded=ro.decoded_tokens, prefilled=ro.prefilled_tokens, adv_abs=A.abs().sum(), stop=float(run.stop),
                **{"reward_" + k: v for k, v in counters.items()},
                **{k: v for k, v in stats.items() if not k.endswith("_max")})
    maxima = {k: v for k, v in stats.items() if k.endswith("_max")}
    vector = lambda d: torch.stack([torch.as_tensor(v, dtype=torch.float64, device=mask.device)  # noqa: E731
                                    for v in d.values()])
    t = dict(zip([*sums, *maxima], torch.cat([all_reduce(vector(sums)),
                                              all_reduce(vector(maxima), dist.ReduceOp.MAX)]).tolist()))
    run.stop, run.nonfinite = t["stop"] > 0, run.nonfinite + 1 if t["skipped"] else 0
    if t["skipped"]:
        print0(f"step {step + 1}: non-finite loss or gradient, {round(t['skipped'])} update(s) skipped")
    n, tok, upd = t["rows"], t["tokens"], t["updates"]
    m = dict(step=step + 1, lr=lr_at(step, run.args), reward_mean=t["reward"] / n, response_len=tok / n,
             truncated_frac=t["truncated"] / n, decoded_tokens=int(t["decoded"]), prefilled_tokens=int(t["prefilled"]),
             entropy=t["entropy"] / tok, adv_abs_mean=t["adv_abs"] / tok, **diag, loss=t["loss"] / upd,
             clip_frac=t["clipped"] / tok, dual_clip_frac=t["dual_clipped"] / tok, approx_kl=t["approx_kl"] / tok,
             grad_norm=t["grad_norm"] / upd, skipped_updates=round(t["skipped"]), logp_gap_max=t["first_gap_max"],
             logp_gap_mean=t["first_gap"] / t["first_tokens"],
             **({"kl_ref": t["kl_ref"] / tok} if "kl_ref" in t else {}),
             **{k: int(v) for k, v in t.items() if k.startswith("reward_")}, **times,
             t_step=sum(times.values()), tokens_per_s=tok / sum(times.values()))
    if "critic_updates" in t:  # explained variance of R by V_old over the step's valid tokens, as verl's
        var = lambda s, s2: s2 / tok - (s / tok) ** 2  # noqa: E731
        m.update(value_loss=t["critic_loss"] / t["critic_updates"],
                 value_clip_frac=t["critic_value_clipped"] / tok,
                 explained_variance=1 - var(t["critic_ev_d"], t["critic_ev_d2"]) / (var(t["critic_ev_r"], t[
                     "critic_ev_r2"]) + 1e-5), critic_grad_norm=t["critic_grad_norm"] / t["critic_updates"],
                 critic_skipped_updates=round(t["critic_skipped"]))
    return m


def validate(run: Run, step: int) -> dict:
    """Greedy accuracy on the validation prompts at step 0, every --val-every steps and after the last."""
    args, t = run.args, time.time()
    if not args.val_every or not (step % args.val_every == 0 or step == args.steps):
        return {}
    with sampling_mode(run.model) as policy, run.ctx():
        summary, _ = evaluate.evaluate(policy, run.tokenizer, args.val_bench, run.val_ex, n=1, temperature=0.0,
                                       max_new_tokens=args.max_new_tokens, batch_size=64, seed=args.seed,
                                       progress=False, kv_budget=args.kv_budget)
    run.val_acc.append((step, summary["accuracy"]))
    return {"val_acc": summary["accuracy"], "val_response_tokens": summary["mean_response_tokens"],
            "val_truncated_frac": summary["truncated_frac"], "t_val": time.time() - t}


def train_step(run: Run, step: int) -> dict:
    """One RL step; returns its metrics row. Each phase is timed once the accelerator has finished it."""
    args, times, t = run.args, {}, [time.time()]

    def lap(name):
        if run.worker.device.type == "cuda":
            torch.cuda.synchronize(run.worker.device)
        times[name], t[0] = time.time() - t[0], time.time()
    ro, idx = rollout_step(run, step)
    lap("t_rollout")
    r, counters, texts = reward_step(run, ro, idx)
    lap("t_reward")
    values = None if run.critic is None else forward_rows(  # V_old, before the update (SPEC 9)
        lambda mb: response_values(unwrap(run.critic), mb, run.ctx), rows_of(ro), args)
    A, weight, returns, diag = advantage_step(run, ro, r, step, values)
    lap("t_advantage")
    stats = update_step(run, ro, A, weight, step, values, returns)
    lap("t_update")
    m = log_step(run, step, ro, r, counters, A, diag, stats, times)
    if run.worker.rank == 0 and args.sample_every and (step + 1) % args.sample_every == 0:
        G = args.group_size
        append_jsonl(os.path.join(args.out, "samples.jsonl"), dict(
            step=step + 1, prompt=run.tokenizer.decode(run.prompts[idx[0]]), completions=texts[:G],
            rewards=r[:G].tolist(), advantage_first_token=A[:G, 0].tolist()))
    return {**m, **validate(run, step + 1), "wall_s": time.time() - run.t0}


def train(args: Args, worker: Worker | None = None, model=None, tokenizer=None) -> dict:
    """Run (or resume) RL training; returns {"val_acc": [(step, acc)], "steps", "out", "stopped"}.
    `model`/`tokenizer` may be given (the benchmark's random shapes); otherwise --model is loaded."""
    from tqdm.auto import tqdm
    run = start_run(args, worker, model, tokenizer)
    metrics, rank0 = os.path.join(args.out, "metrics.jsonl"), run.worker.rank == 0
    if run.start == 0 and args.val_every:
        row = {"step": 0, **validate(run, 0), "wall_s": 0.0}
        print0(f"step 0: validation accuracy {row['val_acc']:.3f}")
        if rank0:
            append_jsonl(metrics, row)
    step = run.start
    with stop_on_signals(run), tqdm(total=args.steps, initial=run.start, desc=args.method, dynamic_ncols=True,
                                    disable=not args.progress or not rank0) as bar:
        for step in range(run.start, args.steps):
            try:
                m = train_step(run, step)
                if rank0:
                    append_jsonl(metrics, m)
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", **({"val": f"{m['val_acc']:.3f}"} if "val_acc" in m
                                                                     else {}))
                if run.nonfinite >= MAX_NONFINITE:
                    raise StopRun(f"{run.nonfinite} steps in a row had a non-finite loss or gradient (a lower --lr?)")
                finite = torch.stack([torch.isfinite(getattr(p, "_local_tensor", p)).all()
                                      for p in run.model.parameters()])
                if not all_reduce(finite.all().float().reshape(1), dist.ReduceOp.MIN).item():  # a huge --lr overflows
                    raise StopRun("an optimizer step made weights inf or NaN (is --lr too high?); stopping before they "
                                  "reach a checkpoint: the last one stands")
                if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == args.steps or run.stop):
                    save_checkpoint(run, step + 1)
            except RuntimeError as e:  # a collective timed out or lost its peer (DistError is a RuntimeError)
                if not dist.is_initialized() or not re.search(r"timed? ?out|connection|broken pipe|closed", str(e),
                                                                  re.I):
                    raise
                raise StopRun(f"step {step + 1}: a collective failed: another rank is hung, slower than "
                              f"--dist-timeout {args.dist_timeout:g} min, or gone ({str(e).splitlines()[0][:160]})"
                              ) from e
            if run.stop:
                print0(f"stopped at step {step + 1}; continue with --resume --out {args.out}")
                break
    if rank0:  # the run's last line: where it wrote
        plot = plot_runs([args.out], os.path.join(args.out, "plot.png"), [args.method])
        ckpt = latest_checkpoint(args.out)
        print(f"wrote {metrics}, {plot}" + (f", checkpoint {ckpt}" if ckpt else ""), flush=True)
    return {"val_acc": run.val_acc, "steps": step + 1 if args.steps > run.start else run.start, "out": args.out,
            "stopped": run.stop}


# ---- infrastructure --------------------------------------------------------------------------------------------------
# 5. The flags: one dataclass, every field one flag (checked once, in check_args)


@dataclass
class Args:
    # --- the algorithm
    method: str = "grpo"  # grpo | tempo | treeadv | hepo | ppo | treeadv-centred | treerl | treepo | spo
    scale: str = "group"  # advantage std: group | batch | none (Dr. GRPO: no std, loss / rows x max tokens)
    td_weight: float = 1.0  # tempo: weight of the TD term (1.0 = the paper)
    objective: str = "grpo"  # ratio: grpo (per token) | gspo (GSPO-token) | gspo-paper (GSPO as published)
    unique_segments: bool = False  # treeadv: weight tokens 1/n(s), training each shared segment once (SPEC 5b)
    kl_coef: float = 0.0  # k3 KL to the frozen initial model, per token (0 = off, the paper)
    # --- model and data
    model: str = "Qwen/Qwen3-1.7B"  # hub id, local directory (our checkpoints too), or `tiny` (random, offline)
    tiny_hidden: int = 64  # tiny model: hidden size (a multiple of 8)
    tiny_layers: int = 2  # tiny model: decoder layers
    task: str = "math"  # evaluate.BENCHES name to train and validate on (add, chain: offline synthetic tasks)
    data: str | None = None  # local training file (json, jsonl, parquet) in the task's schema, instead of the hub
    val_bench: str | None = None  # the benchmark validated on (default: --task; any of evaluate.BENCHES)
    val_data: str | None = None  # local validation file in --val-bench's schema, instead of the hub's test split
    # --- batch
    group_size: int = 7  # G responses per prompt
    prompts_per_step: int = 256  # prompts per RL step over all ranks (SPEC 7: 256)
    mini_batch_prompts: int = 64  # prompts per optimizer step over all ranks (SPEC 7: 64, i.e. 4 updates a step)
    micro_batch_rows: int = 64  # most rows per forward/backward on a rank (no result depends on it)
    micro_batch_tokens: int = 16384  # most positions (rows x longest) per forward/backward on a rank
    # --- sampling
    max_new_tokens: int = 2048  # response budget in tokens (SPEC 7: 2,048)
    sampler: str = "flat"  # flat (G independent responses) | tree (TreeAdv's entropy-forked forest, SPEC 5)
    tree_tau: float = rollout.SamplingConfig.tau  # tree: entropy threshold in nats above which a position may fork
    kv_budget: int | None = None  # most KV-cache positions while sampling (default: what free GPU memory holds)
    # --- optimisation
    lr: float = 1e-6  # AdamW learning rate (SPEC 6: 1e-6, constant); the critic's is 10x
    warmup_steps: int = 0  # linear lr warmup over this many RL steps
    steps: int = 45  # RL steps (SPEC 7: 15 passes over 1,000 prompts at 256 a step)
    seed: int = 0  # seed of the data order, the sampler and the tiny model
    # --- system
    device: str = "auto"  # auto (this rank's GPU if any, bf16 compute) | cpu (fp32) | cuda | cuda:N
    fsdp: bool = False  # shard with FSDP2 instead of DDP
    grad_ckpt: bool | None = None  # gradient checkpointing in the update (default: on CUDA, where memory binds)
    dist_timeout: float = 60.0  # minutes a rank waits in a collective (the slowest rollout) before stopping
    # --- output
    out: str | None = None  # run directory: metrics, samples, plot, checkpoints (default runs/METHOD-TASK)
    resume: bool = False  # continue from OUT's newest checkpoint (a fresh start if OUT holds no run)
    val_every: int = 5  # validate (greedy) before the first step, every N steps and after the last (0 = never)
    val_limit: int | None = 100  # validation prompts (SPEC 7: 100; None = all)
    save_every: int = 10  # checkpoint every N steps, after the last and on SIGTERM (0 = never)
    keep_last: int = 1  # checkpoints kept
    sample_every: int = 5  # log one group's completions to samples.jsonl every N steps (0 = never)
    progress: bool = True  # a progress bar on rank 0
    # --- demo and controls
    demo: bool = False  # the offline demo: tiny Qwen3, supervised warm start on `add`, then RL with --method
    shuffle_rewards: bool = False  # control: permute the step's rewards over its rows, leaving nothing to learn


# The demo's settings (benchmarks/README.md "The demo" has the runs that chose them); flags given win.
DEMO = dict(model="tiny", tiny_hidden=128, tiny_layers=4, task="add", val_limit=500, group_size=8, prompts_per_step=64,
            mini_batch_prompts=64, micro_batch_rows=512, max_new_tokens=8, lr=2e-4, warmup_steps=10, steps=200,
            val_every=50, save_every=200, sample_every=50, device="cpu")
DEMO_WARM = dict(steps=2000, target=0.3, batch=64, lr=1e-3)  # the supervised warm start before the demo's RL
CHOICES = dict(method=METHODS, scale=advantages.SCALES, objective=OBJECTIVES, sampler=("flat", "tree"),
               task=tuple(evaluate.BENCHES), val_bench=tuple(evaluate.BENCHES))
AT_LEAST = dict(tiny_hidden=8, tiny_layers=1, group_size=2, prompts_per_step=1, mini_batch_prompts=1,  # others >= 0
                micro_batch_rows=1, micro_batch_tokens=1, max_new_tokens=1, kv_budget=1, val_limit=1, keep_last=1)


def parse_args(argv: list[str] | None = None, preset: dict | None = None) -> Args:
    """Args from the command line: the field defaults, then `preset` (a benchmark's), then DEMO under --demo,
    then the flags given."""
    given = vars(evaluate.dataclass_parser(Args, __doc__.splitlines()[0]).parse_args(argv))
    layers = [preset or {}, DEMO if given.get("demo") else {}, given]
    args = Args(**{k: v for layer in layers for k, v in layer.items()})
    args.out = args.out or os.path.join("runs", f"demo-{args.method}" if args.demo else f"{args.method}-{args.task}")
    args.val_bench = args.val_bench or args.task
    return args


def check_args(args: Args, world: int = 1) -> None:
    """A UserError naming the flag for a bad value or combination, before anything loads (`world`: torchrun's)."""
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name, options in CHOICES.items():
        need(getattr(args, name) in options, f"{flag(name)} {getattr(args, name)!r}: choose from {', '.join(options)}")
    for f in dataclasses.fields(Args):
        v = getattr(args, f.name)
        need(not isinstance(v, float) or math.isfinite(v), f"{flag(f.name)} {v}: must be a finite number")
        least = AT_LEAST.get(f.name, 0)
        need(not isinstance(v, int) or v >= least, f"{flag(f.name)} {v}: must be at least {least}")
    need(args.lr > 0 and args.kl_coef >= 0 and args.dist_timeout > 0, "--lr, --dist-timeout > 0 and --kl-coef >= 0")
    need(args.tiny_hidden % 8 == 0, f"--tiny-hidden {args.tiny_hidden}: must be a multiple of 8 (4 heads, even size)")
    need(args.method == "tempo" or args.td_weight == 1.0, "--td-weight applies to --method tempo only")
    need(not args.unique_segments or args.method.startswith("treeadv"), "--unique-segments is TreeAdv's (treeadv)")
    need(args.scale == "group" or args.method not in ("treerl", "treepo", "spo"), f"--scale: {args.method} has its own")
    need(args.prompts_per_step % args.mini_batch_prompts == 0,
         f"--prompts-per-step {args.prompts_per_step}: no multiple of --mini-batch-prompts {args.mini_batch_prompts}")
    need(args.mini_batch_prompts % world == 0,
         f"--mini-batch-prompts {args.mini_batch_prompts} does not divide over {world} ranks (each owns whole groups)")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device), f"--device {args.device!r}: auto, cpu, cuda or cuda:N")
    need(not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device}: no CUDA device visible")
    need(not args.demo or (world == 1 and evaluate.BENCHES[args.task].source == "synthetic"),
         "--demo runs in one process on a synthetic task (add or chain), whose rows carry the target `solution`")
    try:  # the sampler's and the model loader's own rules, named by our flags
        rollout.check_config(sampling_config(args), args.group_size, MAX_PROMPT_TOKENS)
        rollout.check_model_name(args.model)
        evaluate.check_hub_model(args.model)
    except ValueError as e:
        raise UserError(re.sub(r"cfg\.(\w+)=", lambda m: flag({"tau": "tree_tau"}.get(m[1], m[1])) + " ", str(e))
                        ) from None
    for name in ("data", "val_data"):
        path = getattr(args, name)
        need(path is None or os.path.isfile(path), f"{flag(name)} {path!r}: no such file")
    need(not os.path.isfile(args.out), f"--out {args.out}: a file, not a directory")
    need(args.resume or args.demo or not holds_run(args.out),
         f"--out {args.out} already holds a run: pass --resume to continue it, or another --out (or delete it)")


def sampling_config(args: Args) -> rollout.SamplingConfig:
    return rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, sampler=args.sampler, tau=args.tree_tau,
                                  kv_budget=args.kv_budget)


# 6. Ranks: the process group, precision, wrapping, sampling mode


class Worker(NamedTuple):
    """This process in the torchrun group: its rank, the number of ranks, and its device."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


@dataclass
class Run:
    """What the loop carries from step to step (built once by `start_run`; a record, no behaviour)."""
    args: Args
    worker: Worker
    model: torch.nn.Module  # the policy: fp32 master weights, wrapped for DDP / FSDP2
    ref: torch.nn.Module | None  # the frozen KL reference, loaded and wrapped as the policy
    critic: torch.nn.Module | None  # --method ppo's value model, wrapped as the policy
    optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer | None
    tokenizer: object
    train_ex: list[dict]
    prompts: list[list[int]]
    val_ex: list[dict]
    cfg: rollout.SamplingConfig
    eos_ids: list[int]
    dtype: torch.dtype  # compute: bf16 autocast over the fp32 weights on CUDA, fp32 on CPU
    start: int = 0
    t0: float = field(default_factory=time.time)  # the wall clock at step 0 (it continues across a resume)
    nonfinite: int = 0  # steps in a row with a skipped update
    stop: bool = False  # SIGTERM / Ctrl-C on some rank: finish the step, save, exit
    val_acc: list = field(default_factory=list)

    def ctx(self):
        """A fresh autocast context: one precision policy for DDP, FSDP2 and one process (README)."""
        return torch.autocast(self.worker.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def setup_worker(args: Args) -> Worker:
    """This process's rank, world size and device; under torchrun it joins the process group."""
    return Worker(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  rollout.setup_device(args.device, args.dist_timeout))


def print0(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (rank order) of a [b, T, ...] tensor, T right-padded with zeros to the longest."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    if x.dtype == torch.bool:  # as integers: not every backend gathers bool
        return gather_rows(x.long()).bool()
    T = int(all_reduce(torch.tensor([x.shape[1]], device=x.device), dist.ReduceOp.MAX))
    x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, T - x.shape[1]))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def unwrap(model):
    """The Hugging Face model inside DDP (FSDP2 changes the model's class in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def sampling_mode(model):
    """Eval mode (gradient checkpointing off) and, under FSDP2, every module unsharded until the block ends: ranks
    run different numbers of forwards (rollout.sample drops finished rows), so none may hold a collective."""
    from torch.distributed.fsdp import FSDPModule
    policy = unwrap(model).eval()
    fsdp = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield policy
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not policy, recurse=False)  # as place_model set them
        if fsdp:  # forget the sampling forwards' order (ranks differ in it), which FSDP would use to prefetch
            policy.reset_iter_state()
        policy.train()


def grad_sync(model, enabled: bool):
    """DDP all-reduces on a mini-batch's last micro-batch only; FSDP2 reduce-scatters after each, so its gradients
    stay sharded (turning that off would hold every layer's full fp32 gradient)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


# 7. Micro-batches by a token budget, and the (prompt, response) rows of one forward


def micro_batches(batch: dict, args: Args) -> list[list[int]]:
    """This rank's micro-batches: rows sorted longest first (a budget too large for the memory fails at once), cut
    greedily into runs of at most --micro-batch-rows rows and --micro-batch-tokens positions (rows x longest); as
    many on every rank (each FSDP2 forward is a collective): the largest are split until the counts agree."""
    lengths = (batch["prompt_mask"].sum(1) + batch["response_mask"].sum(1).clamp(min=1) - 1).tolist()
    plan = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if plan and len(plan[-1]) < args.micro_batch_rows and \
                (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= args.micro_batch_tokens:
            plan[-1].append(i)
        else:
            plan.append([i])
    n = int(all_reduce(torch.tensor([len(plan)], device=batch["response_mask"].device), dist.ReduceOp.MAX))
    while len(plan) < n:
        k = max(range(len(plan)), key=lambda i: len(plan[i]))
        plan[k:k + 1] = [plan[k][:len(plan[k]) // 2], plan[k][len(plan[k]) // 2:]]
    return plan


def pack_rows(batch: dict, rows: list[int]) -> dict:
    """Some rows as one forward's input: each its prompt then its response, no padding between, right-padded to the
    longest; the [b, T] tensors cut to the longest response; head_index, the flat [b * L] position of the hidden
    state that predicts each valid response token (plen - 1 + t predicts token t), row-major."""
    idx = torch.tensor(rows, device=batch["response_mask"].device)
    pm, rm = batch["prompt_mask"][idx], batch["response_mask"][idx]
    plen, rlen, Tp, Tr = pm.sum(1), rm.sum(1), pm.shape[1], rm.shape[1]  # [b], [b]
    T, L = max(int(rlen.max()), 1), max(int((plen + rlen.clamp(min=1) - 1).max()), 1)
    j = torch.arange(L, device=idx.device)[None]  # [1, L]
    prompt_part = batch["prompt_ids"][idx].gather(1, (Tp - plen[:, None] + j).clamp(max=Tp - 1))  # [b, L]
    response_part = batch["response_ids"][idx].gather(1, (j - plen[:, None]).clamp(0, Tr - 1))  # [b, L]
    attn = j < (plen + rlen.clamp(min=1) - 1)[:, None]  # [b, L]
    out = {k: v[idx][:, :T] for k, v in batch.items() if not k.startswith("prompt")}
    flat = (torch.arange(len(rows), device=idx.device) * L + plen - 1)[:, None] + j[:, :T]  # [b, T]
    return dict(out, input_ids=torch.where(j < plen[:, None], prompt_part, response_part).masked_fill(~attn, 0),
                attention_mask=attn.long(), position_ids=j.expand(len(rows), L), head_index=flat[out["response_mask"]])


# 8. Models: one loading path for the policy, the reference and the critic


def start_run(args: Args, worker: Worker | None = None, model=None, tokenizer=None) -> Run:
    """Flags, data (a bad row fails before a model loads), models, optimizers, then the resumed state or a fresh OUT."""
    check_args(args, worker.world_size if worker else int(os.environ.get("WORLD_SIZE", 1)))
    worker = worker or setup_worker(args)
    try:
        train_ex = evaluate.load_examples(args.task, "train", data=args.data, seed=args.seed, limit=None if
                                          evaluate.BENCHES[args.task].source == "synthetic" else TRAIN_PROMPTS)
        val_ex = evaluate.load_examples(args.val_bench, "test", data=args.val_data, limit=args.val_limit,
                                        seed=args.seed, flag="--val-data") if args.val_every else []
    except ValueError as e:
        raise UserError(str(e)) from None
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        print0(f"--resume: {args.out} holds no checkpoint yet; starting fresh")
    policy, ref, critic, tokenizer = load_models(args, worker, model, tokenizer)
    adamw = lambda m, lr: m and torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)  # noqa: E731
    prompts = [evaluate.prompt_ids(args.task, ex, tokenizer) for ex in train_ex]
    keep = [i for i, q in enumerate(prompts) if len(q) <= MAX_PROMPT_TOKENS]
    if len(keep) < args.prompts_per_step:
        raise UserError(f"--prompts-per-step {args.prompts_per_step}: the training set has {len(keep)} prompts of at "
                        f"most {MAX_PROMPT_TOKENS} tokens")
    run = Run(args, worker, policy, ref, critic, adamw(policy, args.lr), adamw(critic, CRITIC_LR_FACTOR * args.lr),
              tokenizer, [train_ex[i] for i in keep], [prompts[i] for i in keep], val_ex, sampling_config(args),
              rollout.eos_token_ids(unwrap(policy), tokenizer), rollout.compute_dtype(worker.device))
    if ckpt:
        load_checkpoint(run, ckpt)
    elif worker.rank == 0:
        fresh_out(args, worker, run.dtype)
    if dist.is_initialized():
        dist.barrier()
    return run


def load_models(args: Args, worker: Worker, model=None, tokenizer=None):
    """(policy, reference or None, critic or None, tokenizer), placed and wrapped on every rank. Each rank reads the
    initial weights itself (rank 0 first, so that a hub model is downloaded once); the reference is a frozen copy
    and the critic (SPEC 9) the policy's architecture as a token-classification model, i.e. its backbone with a
    value head Linear(hidden, 1), drawn N(0, initializer_range) from --seed. On --resume the checkpoint then
    replaces the policy's and the critic's values. A `model` given (the benchmark's random shapes) is used as is."""
    from transformers import AutoModelForTokenClassification
    for turn in (0, 1) if model is None else ():
        if (worker.rank == 0) == (turn == 0):
            model, tokenizer = rollout.load_model_and_tokenizer(args.model, tiny_hidden=args.tiny_hidden,
                                                                tiny_layers=args.tiny_layers, seed=args.seed)
        if dist.is_initialized():
            dist.barrier()
    ref = place_model(copy.deepcopy(model), worker, args, trainable=False) if args.kl_coef > 0 else None
    critic = None
    if args.method == "ppo":
        config = copy.deepcopy(model.config)
        config.num_labels, config.classifier_dropout, config.tie_word_embeddings = 1, 0.0, False
        critic = AutoModelForTokenClassification.from_config(config, dtype=torch.float32)
        critic.model.load_state_dict(model.model.state_dict())
        head = torch.randn((1, config.hidden_size), generator=torch.Generator().manual_seed(args.seed))
        critic.score.weight.data, critic.score.bias.data = head * config.initializer_range, torch.zeros(1)
        critic = place_model(critic, worker, args, trainable=True)
    return place_model(model, worker, args, trainable=True), ref, critic, tokenizer


def place_model(model, worker: Worker, args: Args, trainable: bool):
    """A model's fp32 parameters on this rank's device: sharded by FSDP2 (each decoder layer, then the root; it moves
    the shards there) or whole, in DDP when trainable on several ranks. Frozen: eval mode, no gradients. Trainable:
    gradient checkpointing (--grad-ckpt), which transformers applies in training mode only."""
    if not trainable:
        model.requires_grad_(False).eval()
    elif args.grad_ckpt or (args.grad_ckpt is None and worker.device.type == "cuda"):  # on CPU it costs time only
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)(
            {"use_reentrant": False})
    if args.fsdp:  # no MixedPrecisionPolicy: fp32 weights are gathered and autocast computes, as under DDP
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(worker.device.type, (worker.world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=not trainable)
    else:
        model.to(worker.device)
    if not args.fsdp and worker.world_size > 1 and trainable:  # every rank read the same weights: no broadcast
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[worker.device.index] if worker.device.type == "cuda" else None, init_sync=False,
            forward_sync_buffers=False, gradient_as_bucket_view=True)
    return model.train() if trainable else model


# 9. Checkpoints: one torch.distributed.checkpoint save a step (any world size reads it back), renamed when done


def checkpoint_dirs(out: str) -> list[str]:
    """OUT's complete checkpoints ckpt-NNNNNN, oldest first (an unfinished write is still named .tmp)."""
    return [os.path.join(out, n) for n in sorted(os.listdir(out) if os.path.isdir(out) else [])
            if re.fullmatch(r"ckpt-\d+", n)]


def latest_checkpoint(out: str) -> str | None:
    return (checkpoint_dirs(out) or [None])[-1]


def holds_run(out: str) -> bool:
    return os.path.exists(os.path.join(out, "metrics.jsonl")) or bool(checkpoint_dirs(out))


def training_state(run: Run) -> dict:
    """What a checkpoint holds: the policy and its AdamW (and the critic's), sharded as they are, and the loop's
    place. The data order and the sampler's seeds derive from the step: no RNG state is needed."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    state = {"loop": {"step": 0, "wall_s": 0.0, "nonfinite": 0}}
    for name, model, opt in (("policy", run.model, run.optimizer), ("critic", run.critic, run.critic_optimizer)):
        if model is not None:
            state[name], state[name + "_optim"] = get_state_dict(model, opt)
    return state


def save_checkpoint(run: Run, step: int) -> None:
    """OUT/ckpt-{step}: state/ (`training_state`, each rank writing its shards) and the policy exported for
    `from_pretrained` and --model (gathered into rank 0's CPU memory, then save_pretrained). Written under a .tmp
    name and renamed once every rank is done; then all but the newest --keep-last are deleted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    out, rank0 = run.args.out, run.worker.rank == 0
    tmp, final = os.path.join(out, f"ckpt-{step:06d}.tmp"), os.path.join(out, f"ckpt-{step:06d}")
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    state = dict(training_state(run), loop={"step": step, "wall_s": time.time() - run.t0, "nonfinite": run.nonfinite})
    dcp.save(state, checkpoint_id=os.path.join(tmp, "state"), no_dist=not dist.is_initialized())
    full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank0:
        unwrap(run.model).save_pretrained(tmp, state_dict=full)
        run.tokenizer.save_pretrained(tmp)
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-run.args.keep_last]:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(run: Run, ckpt: str) -> None:
    """--resume: the training state of `ckpt` (resharded to this world size), the loop's place, and the logs cut
    back to its step (a step logged after it is logged again). One that does not load is one line naming it and
    the one before it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = training_state(run)
    try:
        dcp.load(state, checkpoint_id=os.path.join(ckpt, "state"), no_dist=not dist.is_initialized())
    except (Exception, dcp.api.CheckpointException) as e:  # a BaseException, or what a damaged file's reader raises
        older = checkpoint_dirs(run.args.out)[-2:-1]
        why = (str(e).strip() or type(e).__name__).splitlines()[-1][:160]
        raise UserError(f"--resume: {ckpt} does not load ({why}); "
                        "move it aside "
                        + (f"to resume from {older[0]}" if older else "(it is the only checkpoint)")) from None
    for name, model, opt in (("policy", run.model, run.optimizer), ("critic", run.critic, run.critic_optimizer)):
        if model is not None:
            set_state_dict(model, opt, model_state_dict=state[name], optim_state_dict=state[name + "_optim"])
    run.start, run.nonfinite, run.t0 = state["loop"]["step"], state["loop"]["nonfinite"], time.time() - state["loop"][
        "wall_s"]
    print0(f"resumed from {ckpt} at step {run.start}")
    for name in ("metrics.jsonl", "samples.jsonl") if run.worker.rank == 0 else ():
        path = os.path.join(run.args.out, name)
        if os.path.exists(path):
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= run.start)
            os.replace(path + ".tmp", path)


def fresh_out(args: Args, worker: Worker, dtype: torch.dtype) -> None:
    """A fresh run's OUT (rank 0): an earlier run's files removed (check_args lets only the demo replace a run),
    config.json written."""
    if holds_run(args.out):
        print(f"replacing the earlier run in {args.out}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.out):
        if name.startswith("ckpt-") or name in ("metrics.jsonl", "samples.jsonl", "plot.png"):
            (shutil.rmtree if name.startswith("ckpt-") else os.remove)(os.path.join(args.out, name))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(dict(dataclasses.asdict(args), world_size=worker.world_size, compute_dtype=str(dtype)), f, indent=1)


@contextlib.contextmanager
def stop_on_signals(run: Run):
    """While training, SIGTERM and Ctrl-C ask for a stop: the step finishes, a checkpoint is saved, the run exits 0;
    a second Ctrl-C quits at once."""
    def handler(signum, frame):
        if run.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.stop = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# 10. Logs and the plot


def append_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines log; a last line without its newline (a torn write) is skipped."""
    with open(path) as f:
        return [json.loads(line) for line in f.read().split("\n")[:-1] if line.strip()]


def read_metrics(run_dir: str) -> list[dict]:
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def plot_runs(run_dirs: list[str], out_png: str, labels: list[str] | None = None) -> str:
    """Training reward (EMA 0.9, a line) and greedy validation accuracy (dots) against the step, a colour per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(run_dirs):
        rows, ema = read_metrics(run), []
        for r in (r for r in rows if "reward_mean" in r):
            ema.append((r["step"], r["reward_mean"] if not ema else 0.9 * ema[-1][1] + 0.1 * r["reward_mean"]))
        name = labels[i] if labels else os.path.basename(run)
        line, = ax.plot(*zip(*ema or [(0, 0)]), label=f"{name}: reward")
        ax.plot(*zip(*[(r["step"], r["val_acc"]) for r in rows if "val_acc" in r] or [(0, 0)]), "o--",
                color=line.get_color(), label=f"{name}: greedy validation accuracy")
    ax.set(xlabel="step", ylim=(0, 1))
    ax.legend()
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


# 11. The offline demo: a supervised warm start, then RL


def supervised_warm_start(model, tokenizer, task: str, examples: list[dict], *, steps: int, batch_size: int,
                          lr: float, target: float, seed: int = 0, check_every: int = 50) -> tuple[int, float]:
    """Cross-entropy on each example's `solution` + EOS given its prompt until greedy accuracy on the first 200
    examples reaches `target` (checked every 50 steps): a model RL can improve. Not a fixed step count: the tiny
    model's accuracy jumps at a step that varies with the seed and the machine. Returns (steps, accuracy)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pairs = [(evaluate.prompt_ids(task, ex, tokenizer), tokenizer.encode(ex["solution"], add_special_tokens=False)
              + [eos]) for ex in examples]
    g, acc, opt = torch.Generator().manual_seed(seed), 0.0, torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for done in range(1, steps + 1):
        chosen = [pairs[i] for i in torch.randint(len(pairs), (batch_size,), generator=g).tolist()]
        Tp, Ta = max(len(q) for q, _ in chosen), max(len(a) for _, a in chosen)
        ids = torch.full((batch_size, Tp + Ta), pad)  # [b, Tp + Ta]: prompt left-padded, answer right-padded
        labels, attn = torch.full_like(ids, -100), torch.zeros_like(ids)  # the loss on the answer tokens only
        for row, (q, a) in enumerate(chosen):
            ids[row, Tp - len(q):Tp] = torch.tensor(q)
            ids[row, Tp:Tp + len(a)] = labels[row, Tp:Tp + len(a)] = torch.tensor(a)
            attn[row, Tp - len(q):Tp + len(a)] = 1
        logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if done % check_every == 0:  # room for the longest answer, or a correct long answer would score 0
            acc = evaluate.evaluate(model, tokenizer, task, examples[:200], n=1, batch_size=200, progress=False,
                                    max_new_tokens=max(len(a) for _, a in pairs))[0]["accuracy"]
            if acc >= target:
                break
    model.eval()
    return done, acc


def warm_start(args: Args, w: dict = DEMO_WARM) -> str:
    """The demo's warm-started model directory, OUT/warm-start, trained (by the recipe `w`: the study passes its own)
    unless a model of the same recipe is cached there; written to a temporary directory and renamed."""
    warm = os.path.join(args.out, "warm-start")
    recipe = dict(task=args.task, hidden=args.tiny_hidden, layers=args.tiny_layers, **w, seed=args.seed,
                  train_limit=None, check="longest-target")
    with contextlib.suppress(FileNotFoundError), open(os.path.join(warm, "warm_start.json")) as f:
        if json.load(f) == recipe:
            return warm
    t, tokenizer = time.time(), rollout.build_tiny_tokenizer()
    model = rollout.build_tiny_model(tokenizer, args.tiny_hidden, args.tiny_layers, seed=args.seed)
    print0(f"supervised warm start on {args.task} until greedy accuracy {w['target']} on 200 training prompts ...")
    examples = evaluate.load_examples(args.task, "train", seed=args.seed)
    steps, acc = supervised_warm_start(model, tokenizer, args.task, examples, steps=w["steps"], batch_size=w["batch"],
                                       lr=w["lr"], target=w["target"], seed=args.seed)
    tmp = warm.rstrip("/") + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "warm_start.json"), "w") as f:
        json.dump(recipe, f)
    shutil.rmtree(warm, ignore_errors=True)
    os.replace(tmp, warm)
    print0(f"warm start: {steps} steps in {time.time() - t:.0f} s, training accuracy {acc:.2f}; saved to {warm}")
    return warm


def demo(args: Args, worker: Worker | None = None) -> dict:
    """`python train.py --demo`: a tiny Qwen3 and a character tokenizer warm-started on `add` (cached), then RL with
    --method, greedy accuracy before and after, the plot. Offline, minutes on 2 CPU cores."""
    check_args(args, worker.world_size if worker else 1)
    t, result = time.time(), train(dataclasses.replace(args, model=warm_start(args), resume=False), worker)
    (s0, before), (s1, after) = result["val_acc"][0], result["val_acc"][-1]
    print0(f"{args.method}: greedy accuracy on {args.val_limit} {args.task} test prompts: {before:.3f} at step {s0} "
           f"-> {after:.3f} at step {s1} ({after - before:+.3f}) in {time.time() - t:.0f} s")
    return {**result, "before": before, "after": after}


def main(argv: list[str] | None = None):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars beside ours
    # one process saves its checkpoint alone on purpose; torch.distributed.checkpoint warns about it at each save
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")  # we never write into one
    args = parse_args(argv)
    return demo(args) if args.demo else train(args)


def cli(argv: list[str] | None = None) -> int:
    """`python train.py ...`: a user error or a stopped run is one line on stderr; returns the exit code."""
    code = 0
    try:
        main(argv)
    except UserError as e:  # the user's to fix: one line naming the flag or file, argparse's exit code
        if int(os.environ.get("RANK", 0)) == 0:  # every rank finds the same error: rank 0 says it, once
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(10)  # so that rank 0 exits first: torchrun then stops this rank and reports rank 0's exit
        code = 2
    except StopRun as e:  # the run cannot go on, and the message says why (a traceback adds nothing)
        print(f"train.py: stopped: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
