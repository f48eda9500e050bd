"""train.py: the GRPO / TEMPO / TreeAdv / HEPO training loop on Qwen3 (torchrun; DDP or FSDP2), and the offline demo.

What it implements (../shared/SPEC.md):
- SPEC 6, the shared policy loss: PPO-clip with eps_low 0.2 / eps_high 0.28 and dual clip c = 3 for
  negative advantages; log-probs of logits / temperature; token mean over the whole step (also the
  per-sequence mean and Dr. GRPO's divide-by-max-length), computed so that the result does not
  depend on world size or micro-batch size; k3 KL to a frozen reference (off by default); AdamW
  (weight decay 0.01), gradient clipping at 1.0, constant lr with optional warmup.
- SPEC 5, TreeAdv's two objectives: the token ratio, or the GSPO-token ratio
  s_{i,t} = sg[s_i] * pi(o_t) / sg[pi(o_t)] with s_i = exp(mean_t(log pi - log pi_old)); flattened
  leaf paths by default, unique segments by `--unique-segments` (loss weight 1/n(s) per token: the
  copies of a shared token have the same context, hence the same ratio, so n copies weighted 1/n
  equal the segment trained once).
- SPEC 7, the paper's setup as defaults: Qwen/Qwen3-1.7B on MATH, G = 7, 256 prompts a step in
  64-prompt mini-batches (4 optimizer updates per step), 2,048 new tokens, temperature 1, top-p 1,
  lr 1e-6, greedy validation on 100 test problems.
Advantages come from advantages.py (SPEC 1-5), rollouts from rollout.py, rewards and validation
from evaluate.py. The loop's banners read as the algorithm does:
    rollout -> reward -> advantages -> update (micro-batches, gradient accumulation) -> log -> validate / checkpoint

Scale:
- Each rank owns whole prompt groups. The token-mean normaliser is the number of valid tokens of the
  whole mini-batch on all ranks (an all-reduce), each micro-batch's loss sum is divided by it and the
  gradients are summed, so the update is the same on 1 or 8 GPUs and with any micro-batch size.
  Advantages (and the SPEC 8 diagnostics) are computed on the whole step's batch gathered to every
  rank, so batch-level scaling and HEPO's top-20%-of-the-batch mask do not depend on world size either.
- Precision: fp32 parameters and AdamW states (master weights); bf16 compute on GPU (torch.autocast
  under DDP; FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)). Why: at lr 1e-6 an
  update changes a weight by about 1e-6 of itself, far below bf16's resolution (2^-8), so bf16 weights
  would round most updates away. On CPU compute stays fp32 (bf16 pays only from hidden 512 up there).
- Log-probs never hold the (B, T, V) logits in fp32: `token_logprobs` upcasts `logit_chunk` rows at a
  time in the forward pass and recomputes the softmax the same way in the backward pass.
- Gradient checkpointing is switched on once; transformers applies it only in training mode, and
  sampling runs in eval mode, so it acts in the update and never while sampling. The update's forward
  passes use_cache=False explicitly (the config's use_cache stays as it is for sampling).
- DDP by default; `--fsdp` shards with FSDP2 `fully_shard` (per decoder layer, then the root).
  rollout.sample drops finished rows, so ranks make different numbers of forward calls; FSDP would
  all-gather in each and deadlock. `sampling_mode` therefore unshards every FSDP module once before
  sampling and keeps it unsharded until sampling ends, so no collective runs inside the sampler (the
  cost: the full bf16 weights are resident while sampling, as in any FSDP-to-rollout weight gather).

Checkpoints: OUT/ckpt-NNNNNN/ holds model.safetensors + config + tokenizer (loadable with
`from_pretrained` and as `--model`), optimizer.pt, rng-rank{r}.pt and trainer_state.json (step, data
position, wall clock); written to a .tmp directory, renamed with os.replace, then OUT/latest is
replaced atomically, so a crash mid-write leaves the previous checkpoint intact. SIGTERM and Ctrl-C
finish the current step, save, and exit 0; `--resume` continues exactly (N + N steps == 2N straight).

Departures: dual clip also applies to the GSPO-token ratio (the shared loss of SPEC 6); warmup counts
RL steps; `--shuffle-rewards` (a control, not in the papers) permutes rewards over a rank's rows.

Run:
    python train.py --demo                                   # offline CPU demo: warm start, then RL (minutes)
    torchrun --nproc_per_node 8 train.py --method tempo      # the paper's setup (downloads Qwen3-1.7B, MATH)
    torchrun --nproc_per_node 2 train.py --device cpu --model tiny --task add --steps 2 --prompts-per-step 4 \\
        --mini-batch-prompts 4 --max-new-tokens 8            # gloo on CPU (add --fsdp for FSDP2)
    python train.py --bench                                  # step-time split and tokens/s (tiny, CPU)
    python train.py --bench --bench-shape 0.6b               # a Qwen3-0.6B-shaped random model, GPU
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import advantages
import evaluate
import rollout

METHODS = ("grpo", "tempo", "treeadv", "hepo")
OBJECTIVES = ("grpo", "gspo")
LOSS_AGGS = ("token-mean", "seq-mean", "max-len")


# ==============================================================================================
# 1. Arguments: one dataclass; every field one option; checked before anything is loaded


@dataclass
class Args:
    # --- the algorithm
    method: str = "grpo"
    """advantage: grpo (SPEC 1) | tempo (SPEC 3) | treeadv (SPEC 5) | hepo (SPEC 4)"""
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
    """policy ratio: grpo (token ratio) | gspo (GSPO-token ratio)"""
    loss_agg: str = "token-mean"
    """loss aggregation: token-mean over the step | seq-mean | max-len (Dr. GRPO: sum / (rows * max_new_tokens))"""
    clip_low: float = 0.2
    """PPO clip: ratio >= 1 - clip_low"""
    clip_high: float = 0.28
    """PPO clip: ratio <= 1 + clip_high"""
    dual_clip: float = 3.0
    """dual-clip constant c > 1 bounding the loss of negative advantages (0 = off)"""
    kl_coef: float = 0.0
    """k3 KL to the frozen initial model, added per token (0 = off, the paper)"""
    epochs: int = 1
    """policy epochs per rollout batch (old log-probs stored)"""
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
    micro_batch_rows: int = 8
    """rows per forward/backward on a rank (gradient accumulation; no effect on the result)"""
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
    recompute_logprobs: bool = False
    """recompute old log-probs with a forward pass even when the sampler's can serve (top-p 1, top-k 0)"""
    kv_budget: int | None = None
    """most KV-cache token positions while sampling (None: from free GPU memory on CUDA, unbounded on CPU)"""
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
    """token positions whose logits are upcast to fp32 at a time in the log-prob"""
    seed: int = 0
    """seed of data order, sampling and the tiny model"""
    # --- output
    out: str | None = None
    """run directory: metrics.jsonl, samples.jsonl, config.json, checkpoints, plot (default runs/METHOD-TASK)"""
    resume: bool = False
    """continue from OUT's latest checkpoint (a fresh start if there is none)"""
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
    """control: permute the rewards over a rank's rows, so there is nothing to learn"""
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
    bench: bool = False
    """benchmark: run a few steps and print the step-time split and tokens/s"""
    bench_shape: str = "tiny"
    """benchmark model: tiny (--tiny-hidden/--tiny-layers) | 0.6b | 1.7b (Qwen3-shaped, random weights)"""


# The demo's settings. NOTES' recipe (32 prompts x 8 at lr 3e-4 from a 30% warm start) did not learn
# here (greedy accuracy 0.28 -> 0.20 in 200 steps, also with a plain 20-line GRPO loop); measured on this
# machine from the 30% warm start: 32 x 8 at lr 1e-4 +0.08..0.13 in 200-300 steps (noisy), 64 x 8 at
# lr 2e-4 +0.15 in 200 steps (0.28 -> 0.43, climbing steadily). Flags given on the command line still win.
DEMO = dict(model="tiny", tiny_hidden=128, tiny_layers=4, task="add", train_limit=None, val_limit=500,
            group_size=8, prompts_per_step=64, mini_batch_prompts=64, micro_batch_rows=512, max_new_tokens=8,
            lr=2e-4, warmup_steps=10, steps=200, val_every=50, save_every=200, sample_every=50,
            device="cpu", dtype="fp32", grad_ckpt=False, max_prompt_tokens=64, overwrite=True)
# The benchmark's settings: "chain" has the longest responses of the offline tasks.
BENCH = dict(model="tiny", tiny_hidden=128, tiny_layers=4, task="chain", train_limit=None, group_size=8,
             prompts_per_step=16, mini_batch_prompts=16, micro_batch_rows=32, max_new_tokens=64, lr=1e-5,
             steps=4, val_every=0, save_every=0, sample_every=0, overwrite=True, progress=False)


def parse_args(argv: list[str] | None = None) -> Args:
    """Args from the command line. Defaults: the field's, then DEMO/BENCH for --demo/--bench, then the flags."""
    parser = evaluate.dataclass_parser(Args, __doc__.splitlines()[0])
    given = vars(parser.parse_args(argv))
    values = {**(DEMO if given.get("demo") else {}), **(BENCH if given.get("bench") else {}), **given}
    args = Args(**values)
    if args.out is None:  # derived: the run directory
        args.out = os.path.join("runs", "demo-" + args.method if args.demo else "bench" if args.bench
                                else f"{args.method}-{args.task}")
    return args


def check_args(args: Args, world_size: int = 1) -> None:
    """ValueError naming the argument for every invalid value or combination, before any model loads."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(msg)

    need(args.method in METHODS, f"--method {args.method!r}: choose from {', '.join(METHODS)}")
    need(args.scale in advantages.SCALES, f"--scale {args.scale!r}: choose from {', '.join(advantages.SCALES)}")
    need(args.objective in OBJECTIVES, f"--objective {args.objective!r}: choose from {', '.join(OBJECTIVES)}")
    need(args.loss_agg in LOSS_AGGS, f"--loss-agg {args.loss_agg!r}: choose from {', '.join(LOSS_AGGS)}")
    need(args.sampler in ("flat", "tree"), f"--sampler {args.sampler!r}: choose flat or tree")
    need(args.task in evaluate.BENCHES, f"--task {args.task!r}: choose from {', '.join(evaluate.BENCHES)}")
    need(args.group_size >= 2, f"--group-size {args.group_size}: every method compares a prompt's responses, need G >= 2")
    need(args.method == "tempo" or (args.td_weight == 1.0 and args.scale_td),
         "--td-weight / --no-scale-td apply to --method tempo only")
    need(not args.unique_segments or args.method == "treeadv", "--unique-segments is TreeAdv's mode: use --method treeadv")
    need(0 < args.hepo_rho <= 1, f"--hepo-rho {args.hepo_rho}: must be in (0, 1]")
    need(0 <= args.clip_low < 1 and args.clip_high >= 0, f"--clip-low {args.clip_low} / --clip-high {args.clip_high}: "
         "need 0 <= clip_low < 1 and clip_high >= 0")
    need(args.dual_clip == 0 or args.dual_clip > 1, f"--dual-clip {args.dual_clip}: must be > 1 (or 0 = off)")
    need(args.kl_coef >= 0, f"--kl-coef {args.kl_coef}: must be >= 0")
    need(args.epochs >= 1, f"--epochs {args.epochs}: must be >= 1")
    need(args.temperature > 0, f"--temperature {args.temperature}: training needs > 0 (log-probs of logits / T)")
    need(0 < args.top_p <= 1 and args.top_k >= 0, f"--top-p {args.top_p} / --top-k {args.top_k}: need 0 < top_p <= 1, top_k >= 0")
    need(args.max_new_tokens >= 1 and args.max_prompt_tokens >= 1, "--max-new-tokens and --max-prompt-tokens must be >= 1")
    need(args.kv_budget is None or args.kv_budget >= args.max_prompt_tokens + args.max_new_tokens,
         f"--kv-budget {args.kv_budget}: a row reserves --max-prompt-tokens + --max-new-tokens = "
         f"{args.max_prompt_tokens + args.max_new_tokens} positions; give at least that")
    need(args.lr > 0 and args.weight_decay >= 0 and args.grad_clip >= 0, "--lr must be > 0, --weight-decay and --grad-clip >= 0")
    need(args.steps >= 0 and args.warmup_steps >= 0, "--steps and --warmup-steps must be >= 0")
    need(args.micro_batch_rows >= 1 and args.logit_chunk >= 1, "--micro-batch-rows and --logit-chunk must be >= 1")
    need(args.prompts_per_step >= 1 and args.mini_batch_prompts >= 1, "--prompts-per-step and --mini-batch-prompts must be >= 1")
    need(args.prompts_per_step % args.mini_batch_prompts == 0,
         f"--prompts-per-step {args.prompts_per_step} is not a multiple of --mini-batch-prompts {args.mini_batch_prompts}")
    need(args.mini_batch_prompts % world_size == 0,
         f"--mini-batch-prompts {args.mini_batch_prompts} does not divide over {world_size} ranks (each rank owns whole groups)")
    need(args.tree_chains is None or 1 <= args.tree_chains <= args.group_size,
         f"--tree-chains {args.tree_chains}: must be in [1, group_size={args.group_size}]")
    need(args.dtype in ("auto", "bf16", "fp32"), f"--dtype {args.dtype!r}: choose auto, bf16 or fp32")
    need(args.device in ("auto", "cpu") or args.device.startswith("cuda"), f"--device {args.device!r}: auto, cpu or cuda")
    need(not args.device.startswith("cuda") or torch.cuda.is_available(), f"--device {args.device}: no CUDA device visible")
    need(not args.fsdp or dist.is_available(), "--fsdp: this torch build has no torch.distributed")
    need(args.keep_last >= 1 and min(args.val_every, args.save_every, args.sample_every) >= 0,
         "--keep-last must be >= 1; --val-every, --save-every, --sample-every >= 0")
    need(not args.demo or (world_size == 1 and evaluate.BENCHES[args.task].source == "synthetic"),
         "--demo runs in one process on a synthetic task (add or chain), whose rows carry the target `solution`")
    need(args.bench_shape in ("tiny", "0.6b", "1.7b"), f"--bench-shape {args.bench_shape!r}: tiny, 0.6b or 1.7b")
    holds_run = os.path.exists(os.path.join(args.out, "metrics.jsonl"))
    need(not holds_run or args.resume or args.overwrite,
         f"--out {args.out} already holds a run: pass --resume to continue it, --overwrite, or another --out")


# ==============================================================================================
# 2. The policy loss (SPEC 6, and SPEC 5's GSPO-token ratio): small pure functions


class _TokenLogProb(torch.autograd.Function):
    """log softmax(z)[y] with z = logits / temperature, `chunk` rows of fp32 at a time.

    Forward: lp = z_y - logsumexp(z). Backward: d lp / d z = onehot(y) - softmax(z), recomputed from
    the saved logits (kept in their own dtype, e.g. bf16) chunk by chunk, so no (N, V) fp32 tensor
    exists in either pass; the gradient returned to the logits has their dtype.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk):
        lp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # [N]
        for s in range(0, logits.shape[0], chunk):
            z = logits[s:s + chunk].float() / temperature  # [n, V] fp32, n <= chunk
            lp[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - z.logsumexp(1)
        ctx.save_for_backward(logits, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        return lp

    @staticmethod
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # [N, V] in the logits' dtype
        for s in range(0, logits.shape[0], ctx.chunk):
            g = grad[s:s + ctx.chunk, None].float()  # [n, 1]
            gz = torch.softmax(logits[s:s + ctx.chunk].float() / ctx.temperature, 1).mul_(-g)  # [n, V]
            gz.scatter_add_(1, targets[s:s + ctx.chunk, None], g)
            grad_logits[s:s + ctx.chunk] = gz.div_(ctx.temperature)
        return grad_logits, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 1024) -> torch.Tensor:
    """log pi(y | s) = log_softmax(logits / temperature)[y], float32, for logits [..., V] and targets [...].

    Equal to `log_softmax(logits.float() / T).gather(-1, y)` (the tests check values and gradients)
    without an fp32 copy of all the logits at once.
    """
    V = logits.shape[-1]
    lp = _TokenLogProb.apply(logits.reshape(-1, V), targets.reshape(-1), float(temperature), int(chunk))
    return lp.view(targets.shape)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """H = logsumexp(z) - sum_a softmax(z)_a z_a for z = logits / temperature, float32 [...], no gradient."""
    flat = logits.reshape(-1, logits.shape[-1])
    H = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], chunk):
        z = flat[s:s + chunk].float() / temperature
        H[s:s + chunk] = z.logsumexp(1) - (torch.softmax(z, 1) * z).sum(1)
    return H.view(logits.shape[:-1])


def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, objective: str = "grpo") -> torch.Tensor:
    """The importance ratio per token, [B, T].

    grpo: r_{i,t} = exp(log pi(o_t) - log pi_old(o_t)).
    gspo (GSPO-token): s_{i,t} = sg[s_i] * pi(o_t) / sg[pi(o_t)], s_i = exp(mean_t (log pi - log pi_old)) over
    row i's valid tokens; its value is s_i at every token, its gradient s_i * grad log pi(o_t).
    """
    if objective == "grpo":
        return torch.exp(logp - old_logp)
    m = mask.float()
    log_s = ((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp(min=1)  # [B] log s_i
    return torch.exp(log_s.detach()[:, None] + logp - logp.detach())


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


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def loss_normaliser(mask: torch.Tensor, weight: torch.Tensor, agg: str, max_len: int) -> float:
    """This rank's share of the normaliser; all-reduced (summed) over ranks before `aggregate`.

    token-mean: sum of token weights over valid tokens (their count when weights are 1; the number of
    distinct tree tokens with unique segments); seq-mean: rows; max-len: rows * max_new_tokens.
    """
    if agg == "token-mean":
        return float((weight * mask).sum())
    rows = float(mask.shape[0])
    return rows if agg == "seq-mean" else rows * max_len


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, agg: str,
              normaliser: float) -> torch.Tensor:
    """This micro-batch's part of the step loss: its sum divided by the global normaliser N.

    token-mean and max-len: sum_{i,t} w l / N. seq-mean: sum_i (sum_t w l / |o_i|) / N.
    Summed over micro-batches and ranks this is the loss of the whole mini-batch, whatever the split.
    """
    wl = per_token * weight * mask
    if agg == "seq-mean":
        return (wl.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    return wl.sum() / normaliser


def policy_loss(logp, old_logp, A, mask, weight, normaliser: float, *, objective: str = "grpo",
                clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float = 3.0, agg: str = "token-mean",
                kl_coef: float = 0.0, ref_logp=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SPEC 6 loss of one micro-batch ([b, T] inputs), and sums over its valid tokens for logging."""
    m = mask.float()
    ratio = policy_ratio(logp, old_logp, mask, objective)
    per_token, is_clipped, is_dual = ppo_clip_loss(ratio, A, clip_low, clip_high, dual_clip)
    stats = dict(tokens=m.sum(), clipped=(is_clipped * m).sum(), dual_clipped=(is_dual * m).sum(),
                 approx_kl=(k3_kl(logp.detach(), old_logp) * m).sum())  # KL(pi || pi_old) by k3
    if kl_coef > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_coef * kl
        stats["kl_ref"] = (kl.detach() * m).sum()
    return aggregate(per_token, m, weight, agg, normaliser), stats


# ==============================================================================================
# 3. Distributed setup, precision, model modes


@dataclass
class Dist:
    """This process's place: rank, world size, and its device."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")


def setup_distributed(device: str = "auto") -> Dist:
    """Under torchrun (RANK in the environment) join the process group: NCCL on CUDA, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device.startswith("cuda") else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


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


def eos_token_ids(model, tokenizer) -> list[int]:
    """Where a response ends: the tokenizer's EOS and the model's generation EOS (Qwen3: <|im_end|>, <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    return sorted(i for i in ids if i is not None)


def unwrap(model):
    """The Hugging Face model inside DDP (FSDP2 changes the model's class in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def wrap_model(model, d: Dist, fsdp: bool, compute_dtype: torch.dtype, trainable: bool = True):
    """FSDP2 (each decoder layer, then the root; bf16 compute, fp32 reduce) or DDP (more than one rank)."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(d.device.type, (d.world,))  # explicit: gloo on CPU even where CUDA exists
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        return model
    if d.world > 1 and trainable:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def autocast(model, d: Dist, compute_dtype: torch.dtype):
    """bf16 autocast over fp32 weights (DDP / one process); FSDP2 casts by its MixedPrecisionPolicy."""
    if compute_dtype == torch.float32 or _fsdp_modules(model):
        return contextlib.nullcontext()
    return torch.autocast(d.device.type, dtype=compute_dtype)


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


def _sync(d: Dist):
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)


def peak_memory_gb(d: Dist) -> float:
    """Peak accelerator memory since the last call (CUDA), or the process's peak RSS (CPU)."""
    if d.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(d.device) / 2**30
        torch.cuda.reset_peak_memory_stats(d.device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ==============================================================================================
# 4. Forward passes over (prompt, response) rows, micro-batch by micro-batch


def micro_batch(batch: dict, rows: slice) -> dict:
    """Rows of a batch, with the padding columns that no row of them uses cut off (prompts are
    left-padded, responses right-padded)."""
    pm, rm = batch["prompt_mask"][rows], batch["response_mask"][rows]
    Tp, T = int(pm.sum(1).max()), max(int(rm.sum(1).max()), 1)
    out = {}
    for k, v in batch.items():
        v = v[rows]
        out[k] = v[:, v.shape[1] - Tp:] if k.startswith("prompt") else v[:, :T] if v.dim() == 2 else v
    return out


def response_logprobs(model, mb: dict, temperature: float, chunk: int, ctx) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for every response position of a micro-batch, [b, T] float32.

    The logits are computed for the last T + 1 positions only (logits_to_keep): position Tp - 1 + t
    predicts response token t; the final position predicts nothing and gets a dummy target.
    """
    ids = torch.cat([mb["prompt_ids"], mb["response_ids"]], 1)  # [b, Tp + T]
    attn = torch.cat([mb["prompt_mask"], mb["response_mask"]], 1).long()
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # as rollout.sample numbers them
    T = mb["response_ids"].shape[1]
    with ctx:
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                       logits_to_keep=T + 1).logits  # [b, T + 1, V]
    targets = F.pad(mb["response_ids"], (0, 1))  # [b, T + 1]
    return token_logprobs(logits, targets, temperature, chunk)[:, :T]


@torch.no_grad()
def batch_logprobs(model, batch: dict, args: Args, ctx) -> torch.Tensor:
    """No-grad log-probs of every row ([B, T], 0 at padding): old log-probs when recomputed, reference log-probs."""
    B, T = batch["response_mask"].shape
    out = torch.zeros(B, T, device=batch["response_mask"].device)
    for s in range(0, B, args.micro_batch_rows):
        mb = micro_batch(batch, slice(s, s + args.micro_batch_rows))
        lp = response_logprobs(model, mb, args.temperature, args.logit_chunk, ctx)
        out[s:s + lp.shape[0], :lp.shape[1]] = lp * mb["response_mask"]
    return out


def accumulate_gradients(model, batch: dict, normaliser: float, args: Args, world: int, ctx) -> dict[str, float]:
    """Forward and backward over a rank's mini-batch in micro-batches of `micro_batch_rows` rows.

    Each micro-batch's loss is already its share of the global mini-batch loss (the normaliser is
    global), so gradients must be summed over micro-batches and ranks. Accumulation sums; DDP and
    FSDP average over ranks, hence the factor `world`. Returns sums for logging (loss, tokens, ...).
    """
    B = batch["A"].shape[0]
    starts = list(range(0, B, args.micro_batch_rows))
    sums: dict[str, torch.Tensor] = {}
    for k, s in enumerate(starts):
        mb = micro_batch(batch, slice(s, s + args.micro_batch_rows))
        with grad_sync(model, enabled=k == len(starts) - 1):
            logp = response_logprobs(model, mb, args.temperature, args.logit_chunk, ctx)
            loss, stats = policy_loss(
                logp, mb["old_logp"], mb["A"], mb["response_mask"], mb["weight"], normaliser,
                objective=args.objective, clip_low=args.clip_low, clip_high=args.clip_high, dual_clip=args.dual_clip,
                agg=args.loss_agg, kl_coef=args.kl_coef, ref_logp=mb.get("ref_logp"))
            (loss * world).backward()
        for key, v in {"loss": loss.detach(), **stats}.items():
            sums[key] = sums.get(key, 0) + v.float()
    return {k: float(v) for k, v in sums.items()}


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
    optimizer.zero_grad(set_to_none=True)
    return float(norm), not ok


def lr_at(step: int, args: Args) -> float:
    """Constant lr after a linear warmup over `warmup_steps` RL steps (step counts from 0)."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


# ==============================================================================================
# 5. Advantages of one step (advantages.py), on the whole step's batch


def compute_advantages(args: Args, responses, mask, rewards, entropy) -> torch.Tensor:
    """A [B, T] float32 for `--method`; 0 at padding."""
    G = args.group_size
    if args.method == "grpo":
        return advantages.grpo_advantages(rewards, G, scale=args.scale)[:, None] * mask
    if args.method == "tempo":
        return advantages.tempo_advantages(responses, mask, rewards, G, td_weight=args.td_weight,
                                           scale=args.scale, scale_td=args.scale_td)
    if args.method == "treeadv":
        return advantages.treeadv_advantages(responses, mask, rewards, G, scale=args.scale)
    return advantages.hepo_advantages(entropy, mask, rewards, G, rho=args.hepo_rho, scale=args.scale)


def step_prompts(step: int, n: int, P: int, seed: int) -> tuple[list[int], int, int]:
    """The P prompt indices of a step, and its data position (pass, offset): passes over the n prompts
    in a fresh seeded order each, dropping the last incomplete batch of a pass."""
    per_pass = n // P
    p, k = divmod(step, per_pass)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + p)).tolist()
    return order[k * P:(k + 1) * P], p, k * P


def sample_seed(seed: int, step: int, rank: int) -> int:
    """A distinct sampler seed per (run seed, step, rank): rollout's randomness is counter-based per batch."""
    return (seed * 1_000_003 + step) * 65_537 + rank


# ==============================================================================================
# 6. Checkpoints: atomic, complete (model, optimizer, RNG, step, data position), resumable


def latest_checkpoint(out: str) -> str | None:
    """OUT/<name> that OUT/latest names, if it exists."""
    try:
        with open(os.path.join(out, "latest")) as f:
            path = os.path.join(out, f.read().strip())
    except FileNotFoundError:
        return None
    return path if os.path.isdir(path) else None


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def save_checkpoint(out: str, step: int, model, optimizer, tokenizer, state: dict, d: Dist, keep_last: int) -> str:
    """Write OUT/ckpt-{step}: rank 0 writes the full model (safetensors) and optimizer, every rank its RNG.
    All ranks must call it (gathering FSDP shards is a collective)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    name = f"ckpt-{step:06d}"
    final, tmp = os.path.join(out, name), os.path.join(out, name + ".tmp")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_dict_options(cpu_offload=True))
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    if d.rank == 0:
        unwrap(model).save_pretrained(tmp, state_dict=model_sd, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if d.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(d.device)
    os.makedirs(tmp, exist_ok=True)  # other nodes' view, when OUT is not on a shared filesystem
    torch.save(rng, os.path.join(tmp, f"rng-rank{d.rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if d.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
        kept = sorted(n for n in os.listdir(out) if n.startswith("ckpt-") and not n.endswith(".tmp"))
        for old in kept[:-keep_last]:
            shutil.rmtree(os.path.join(out, old))
    if dist.is_initialized():
        dist.barrier()
    return final


def load_training_state(ckpt: str, model, optimizer, d: Dist) -> dict:
    """Optimizer state and this rank's RNG from a checkpoint (the model was loaded from it already)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    optim_sd = torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu", weights_only=True, mmap=True)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=_state_dict_options())
    rng_file = os.path.join(ckpt, f"rng-rank{d.rank}.pt")
    if os.path.exists(rng_file):  # a different world size resumes with fresh RNG (sampling seeds are explicit)
        rng = torch.load(rng_file, weights_only=True)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        return json.load(f)


STOP = {"requested": False}


def _request_stop(signum, frame):
    """SIGTERM / Ctrl-C: finish the step, save, exit. A second Ctrl-C quits at once."""
    if STOP["requested"] and signum == signal.SIGINT:
        raise KeyboardInterrupt
    STOP["requested"] = True
    print(f"[rank {os.environ.get('RANK', 0)}] {signal.Signals(signum).name}: finishing this step, saving, exiting",
          file=sys.stderr, flush=True)


# ==============================================================================================
# 7. Logs and plots


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ==============================================================================================
# 8. The loop


def validate(model, tokenizer, args: Args, examples: list[dict], ctx) -> dict:
    """Greedy accuracy on the validation examples (evaluate.evaluate; split over ranks, summary on all)."""
    with sampling_mode(model) as policy, ctx:
        summary, _ = evaluate.evaluate(policy, tokenizer, args.task, examples, n=1, temperature=0.0,
                                       max_new_tokens=args.max_new_tokens, batch_size=args.val_batch_size,
                                       thinking=args.thinking, seed=args.seed, progress=False,
                                       kv_budget=args.kv_budget, compile_decode=args.compile_decode)
    return summary


def train(args: Args, d: Dist | None = None, model=None, tokenizer=None) -> dict:
    """Run (or resume) RL training; returns {"val_acc": [(step, acc), ...], "steps": last step, "out": OUT}.

    `model`/`tokenizer` may be given (the benchmark's random shapes); otherwise --model is loaded.
    """
    d = d or setup_distributed(args.device)
    check_args(args, d.world)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars between ours
    compute_dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and d.device.type == "cuda") else torch.float32
    torch.manual_seed(args.seed + d.rank)
    random.seed(args.seed + d.rank)
    G, P_local = args.group_size, args.prompts_per_step // d.world
    metrics_path, samples_path = os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "samples.jsonl")

    # ---- data first: a wrong --task/--data fails in seconds, before a model loads
    train_ex = evaluate.load_examples(args.task, "train", data=args.data, limit=args.train_limit, seed=args.seed)
    val_ex = evaluate.load_examples(args.task, "test", data=args.val_data, limit=args.val_limit,
                                    seed=args.seed) if args.val_every else []

    # ---- model: fp32 master weights; from the latest checkpoint when resuming
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if model is None:
        model, tokenizer = rollout.load_model_and_tokenizer(
            ckpt or args.model, device="cpu" if args.fsdp else d.device, dtype=torch.float32,
            tiny_hidden=args.tiny_hidden, tiny_layers=args.tiny_layers, seed=args.seed)
    prompts = [evaluate.prompt_ids(args.task, ex, tokenizer, args.thinking) for ex in train_ex]
    keep = [i for i, q in enumerate(prompts) if len(q) <= args.max_prompt_tokens]
    if len(keep) < len(prompts):
        print0(f"dropped {len(prompts) - len(keep)} prompts longer than --max-prompt-tokens {args.max_prompt_tokens}")
    train_ex, prompts = [train_ex[i] for i in keep], [prompts[i] for i in keep]
    if len(prompts) < args.prompts_per_step:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step}: the training set has only {len(prompts)} prompts")
    ref = None
    if args.kl_coef > 0:  # the frozen reference: the initial model, never a checkpoint
        ref, _ = rollout.load_model_and_tokenizer(args.model, device="cpu" if args.fsdp else d.device,
                                                  dtype=compute_dtype, tiny_hidden=args.tiny_hidden,
                                                  tiny_layers=args.tiny_layers, seed=args.seed)
        ref = wrap_model(ref.requires_grad_(False).eval(), d, args.fsdp, compute_dtype, trainable=False)
    if args.grad_ckpt:  # active only in training mode, i.e. in the update (see the module docstring)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    model = wrap_model(model, d, args.fsdp, compute_dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ctx = lambda: autocast(model, d, compute_dtype)  # noqa: E731 - a fresh context each use

    start, wall0, nonfinite_run = 0, 0.0, 0
    if ckpt:
        state = load_training_state(ckpt, model, optimizer, d)
        start, wall0, nonfinite_run = state["step"], state["wall_s"], state["nonfinite_in_a_row"]
        print0(f"resumed from {ckpt} at step {start}")
        if d.rank == 0 and os.path.exists(metrics_path):  # drop lines logged after the checkpoint
            rows = [r for r in read_metrics(args.out) if r["step"] <= start]
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    elif d.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        for name in os.listdir(args.out):  # --overwrite: nothing of an earlier run may be mistaken for this one's
            if name.startswith("ckpt-"):
                shutil.rmtree(os.path.join(args.out, name))
            elif name in ("metrics.jsonl", "samples.jsonl", "latest", "plot.png"):
                os.remove(os.path.join(args.out, name))
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(args), "world_size": d.world, "compute_dtype": str(compute_dtype),
                       "device": str(d.device)}, f, indent=1)
    if dist.is_initialized():
        dist.barrier()

    cfg = rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                 top_k=args.top_k, sampler=args.sampler, **{k: v for k, v in dict(
                                     tau=args.tree_tau, num_chains=args.tree_chains, max_children=args.tree_children,
                                     max_forks=args.tree_forks).items() if v is not None}, compile=args.compile_decode)
    eos_ids = eos_token_ids(unwrap(model), tokenizer)
    use_sampler_logprobs = args.top_p == 1.0 and args.top_k == 0 and not args.recompute_logprobs
    t_run = time.time() - wall0  # wall clock continues across a resume
    val_acc = []

    def log_val(step: int) -> dict:
        t = time.time()
        summary = validate(model, tokenizer, args, val_ex, ctx())
        val_acc.append((step, summary["accuracy"]))
        return {"val_acc": summary["accuracy"], "val_response_tokens": summary["mean_response_tokens"],
                "val_truncated_frac": summary["truncated_frac"], "t_val": time.time() - t}

    if start == 0 and args.val_every:
        row = {"step": 0, "wall_s": time.time() - t_run, **log_val(0)}
        if d.rank == 0:
            _append_jsonl(metrics_path, row)
        print0(f"step 0: validation accuracy {row['val_acc']:.3f}")

    old_handlers = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    STOP["requested"] = False
    from tqdm.auto import tqdm
    bar = tqdm(total=args.steps, initial=start, desc=f"{args.method}", dynamic_ncols=True,
               disable=not args.progress or d.rank != 0)
    step = start
    try:
        for step in range(start, args.steps):
            _sync(d)
            t0 = time.time()
            m: dict = {"step": step + 1, "lr": lr_at(step, args)}

            # ======== 1. rollout: this rank's whole prompt groups, G responses each
            idx, data_pass, data_offset = step_prompts(step, len(prompts), args.prompts_per_step, args.seed)
            idx = idx[d.rank * P_local:(d.rank + 1) * P_local]
            with sampling_mode(model) as policy, ctx():
                budget = args.kv_budget  # CUDA default: what free memory holds, AdamW's states to come kept
                if budget is None and d.device.type == "cuda":
                    budget = rollout.default_kv_budget(policy, rows=len(idx) * G, optimizer=optimizer)
                ro = rollout.sample(policy, [prompts[i] for i in idx], G, dataclasses.replace(cfg, kv_budget=budget),
                                    eos_token_ids=eos_ids,
                                    pad_token_id=tokenizer.pad_token_id, seed=sample_seed(args.seed, step, d.rank))
            mask = ro.response_mask  # [B, T] bool, B = P_local * G
            _sync(d)
            t1 = time.time()

            # ======== 2. reward: evaluate.py's verifier, one reward per response
            lengths = mask.sum(1).tolist()
            completions = [tokenizer.decode(r[:n], skip_special_tokens=True)
                           for r, n in zip(ro.response_ids.tolist(), lengths)]
            examples = [train_ex[i] for i in idx for _ in range(G)]
            rewards, counters = evaluate.score_batch(args.task, completions, examples)
            r = torch.tensor(rewards, dtype=torch.float32, device=mask.device)  # [B]
            if args.shuffle_rewards:  # the control: rewards no longer belong to their responses
                g = torch.Generator().manual_seed(sample_seed(args.seed, step, d.rank))
                r = r[torch.randperm(len(r), generator=g).to(r.device)]
            t2 = time.time()

            # ======== 3. advantages: on the whole step's batch (every rank's groups), then this rank's rows
            B, T = mask.shape
            resp_all, mask_all = gather_rows(ro.response_ids), gather_rows(mask.long()).bool()
            r_all, ent_all = gather_rows(r[:, None])[:, 0], gather_rows(ro.entropy)
            A = compute_advantages(args, resp_all, mask_all, r_all, ent_all)[d.rank * B:(d.rank + 1) * B, :T]
            diag = advantages.branch_diagnostics(resp_all, mask_all, r_all, G)
            weight = torch.ones_like(A)
            if args.unique_segments:  # SPEC 5b: n copies of a shared token, weight 1/n each = trained once
                weight = 1.0 / advantages.prefix_counts(ro.response_ids, mask, G).clamp(min=1).float()
            _sync(d)
            t3 = time.time()

            # ======== 4. update: old (and reference) log-probs, then epochs x mini-batches x micro-batches
            batch = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, response_ids=ro.response_ids,
                         response_mask=mask, A=A, weight=weight)
            batch["old_logp"] = ro.logprobs if use_sampler_logprobs else batch_logprobs(unwrap(model), batch, args, ctx())
            if ref is not None:
                batch["ref_logp"] = batch_logprobs(ref, batch, args, ctx())
            _sync(d)
            t4 = time.time()
            rows_per_update = args.mini_batch_prompts // d.world * G
            sums, norms, skipped = {}, [], 0
            for _ in range(args.epochs):
                for s in range(0, B, rows_per_update):
                    mb = {k: v[s:s + rows_per_update] for k, v in batch.items()}
                    N = torch.tensor([loss_normaliser(mb["response_mask"], mb["weight"], args.loss_agg,
                                                      args.max_new_tokens)], dtype=torch.float64, device=mask.device)
                    N = max(float(all_reduce(N)), 1e-12)
                    part = accumulate_gradients(model, mb, N, args, d.world, ctx())
                    gn, was_skipped = apply_update(model, optimizer, m["lr"], args.grad_clip, math.isfinite(part["loss"]))
                    norms.append(gn)
                    skipped += was_skipped
                    for k, v in part.items():
                        sums[k] = sums.get(k, 0.0) + v
            _sync(d)
            t5 = time.time()

            # ======== 5. log: global sums over ranks, then rank 0 writes one line
            local = dict(reward=float(r.sum()), rows=float(B), tokens=float(mask.sum()),
                         entropy=float((ro.entropy * mask).sum()), truncated=float((~ro.finished).sum()),
                         decoded=float(ro.decoded_tokens), prefilled=float(ro.prefilled_tokens),
                         adv_abs=float(A.abs().sum()), **{f"c_{k}": float(v) for k, v in counters.items()},
                         **{f"s_{k}": v for k, v in sums.items()})
            tot = dict(zip(local, all_reduce(torch.tensor(list(local.values()), dtype=torch.float64,
                                                          device=mask.device)).tolist()))
            n_updates = args.epochs * (B // rows_per_update + (B % rows_per_update > 0))
            m.update(
                reward_mean=tot["reward"] / tot["rows"], response_len=tot["tokens"] / tot["rows"],
                truncated_frac=tot["truncated"] / tot["rows"], decoded_tokens=int(tot["decoded"]),
                prefilled_tokens=int(tot["prefilled"]), entropy=tot["entropy"] / tot["tokens"],
                adv_abs_mean=tot["adv_abs"] / tot["tokens"], **diag,
                loss=tot["s_loss"] / n_updates, clip_frac=tot["s_clipped"] / tot["s_tokens"],
                dual_clip_frac=tot["s_dual_clipped"] / tot["s_tokens"], approx_kl=tot["s_approx_kl"] / tot["s_tokens"],
                grad_norm=sum(norms) / len(norms), skipped_updates=skipped,
                **({"kl_ref": tot["s_kl_ref"] / tot["s_tokens"]} if "s_kl_ref" in tot else {}),
                **{f"reward_{k[2:]}": int(v) for k, v in tot.items() if k.startswith("c_")},
                t_rollout=t1 - t0, t_reward=t2 - t1, t_advantage=t3 - t2, t_logprob=t4 - t3, t_update=t5 - t4,
                t_step=t5 - t0, tokens_per_s=tot["tokens"] / (t5 - t0), decode_tokens_per_s=tot["decoded"] / (t1 - t0),
                update_tokens_per_s=args.epochs * tot["tokens"] / (t5 - t4), peak_mem_gb=peak_memory_gb(d),
                data_pass=data_pass, data_offset=data_offset)
            nonfinite_run = nonfinite_run + 1 if skipped else 0
            if skipped:
                print0(f"step {step + 1}: non-finite loss or gradient, {skipped} update(s) skipped ({nonfinite_run} step(s) in a row)")
            if d.rank == 0 and args.sample_every and (step + 1) % args.sample_every == 0:
                _append_jsonl(samples_path, {"step": step + 1, "prompt": tokenizer.decode(prompts[idx[0]]),
                                             "completions": completions[:G], "rewards": r[:G].tolist(),
                                             "advantage_first_token": A[:G, 0].tolist()})

            # ======== 6. validate / checkpoint
            last = step + 1 == args.steps
            if args.val_every and ((step + 1) % args.val_every == 0 or last):
                m.update(log_val(step + 1))
            m["wall_s"] = time.time() - t_run
            if d.rank == 0:
                _append_jsonl(metrics_path, m)
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", **({"val": f"{m['val_acc']:.3f}"} if "val_acc" in m else {}))
            stop = bool(all_reduce(torch.tensor([float(STOP["requested"])], device=mask.device), dist.ReduceOp.MAX).item())
            if args.save_every and ((step + 1) % args.save_every == 0 or last or stop):
                next_pass, next_k = divmod(step + 1, len(prompts) // args.prompts_per_step)
                state = {"step": step + 1, "wall_s": time.time() - t_run, "nonfinite_in_a_row": nonfinite_run,
                         "data_pass": next_pass, "data_offset": next_k * args.prompts_per_step,
                         "world_size": d.world, "seed": args.seed}
                save_checkpoint(args.out, step + 1, model, optimizer, tokenizer, state, d, args.keep_last)
            if nonfinite_run >= args.max_nonfinite:
                raise RuntimeError(f"{nonfinite_run} steps in a row had a non-finite loss or gradient; stopping "
                                   f"(see {metrics_path}; try a lower --lr)")
            if stop:
                print0(f"stopped at step {step + 1}" + (f"; continue with --resume --out {args.out}" if args.save_every else ""))
                break
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return {"val_acc": val_acc, "steps": step + 1 if args.steps > start else start, "out": args.out,
            "stopped": STOP["requested"]}


# ==============================================================================================
# 9. The offline demo and the benchmark


def supervised_warm_start(model, tokenizer, task: str, examples: list[dict], *, steps: int, batch_size: int,
                          lr: float, seed: int = 0, target: float | None = None, check_every: int = 50,
                          check_examples: list[dict] | None = None) -> tuple[int, float, float | None]:
    """Cross-entropy on the target completion (`solution` + EOS) given the prompt: the demo's starting point,
    a model with partial accuracy for RL to improve. With `target`, stops once greedy accuracy on
    `check_examples` reaches it (the tiny model's accuracy jumps within a few hundred steps, at a step that
    varies with seed and machine, so a fixed step count would start RL from 5% or from 60%).
    Returns (steps done, last loss, last accuracy checked or None)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pairs = [(evaluate.prompt_ids(task, ex, tokenizer), tokenizer.encode(ex["solution"], add_special_tokens=False) + [eos])
             for ex in examples]
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
    print0(f"warm start: {steps} steps in {time.time() - t:.0f} s, loss {loss:.3f}, training accuracy {acc}; saved to {warm}")
    return warm


def demo(args: Args, d: Dist | None = None) -> dict:
    """`python train.py --demo`: tiny Qwen3 + character tokenizer, a supervised warm start on the
    synthetic task to partial accuracy (cached), RL with --method, greedy accuracy before and after,
    and the plot. Everything offline, a few minutes on 2 CPU cores."""
    d = d or setup_distributed(args.device)
    check_args(args, d.world)
    rl = dataclasses.replace(args, model=warm_start(args), demo=False)
    t = time.time()
    result = train(rl, d)
    (s0, before), (s1, after) = result["val_acc"][0], result["val_acc"][-1]
    png = plot_runs([args.out], os.path.join(args.out, "plot.png"), labels=[f"{args.method} (demo)"])
    print0(f"\n{args.method}: greedy accuracy on {args.val_limit} {args.task} test prompts: {before:.3f} at step {s0} "
           f"-> {after:.3f} at step {s1} ({after - before:+.3f}) in {time.time() - t:.0f} s of RL\n"
           f"plot: {png}   metrics: {os.path.join(args.out, 'metrics.jsonl')}")
    return {**result, "before": before, "after": after}


QWEN3_SHAPES = {  # Qwen3-0.6B / -1.7B as in their config.json (vocab 151,936, tied embeddings)
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
}


def benchmark(args: Args, d: Dist | None = None) -> dict:
    """`python train.py --bench`: a few RL steps, then the step-time split and tokens/s (median after step 1).

    tiny: the tiny Qwen3 (--tiny-hidden x --tiny-layers) on CPU. 0.6b / 1.7b: a Qwen3-shaped model
    with random weights and the real vocabulary (151,936) with the character tokenizer; random weights
    almost never sample EOS, so every response runs to --max-new-tokens: a worst-case step.
    """
    d = d or setup_distributed(args.device)
    model = tokenizer = None
    if args.bench_shape != "tiny":
        from transformers import Qwen3Config, Qwen3ForCausalLM
        tokenizer = rollout.build_tiny_tokenizer()
        config = Qwen3Config(vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=40_960,
                             rope_theta=1_000_000.0, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **QWEN3_SHAPES[args.bench_shape])
        torch.manual_seed(args.seed)
        with torch.device("cpu" if args.fsdp else d.device):
            model = Qwen3ForCausalLM(config)
    t = time.time()
    train(args, d, model, tokenizer)
    rows = [r for r in read_metrics(args.out) if "t_step" in r]
    timed = rows[1:] or rows  # the first step pays for warm-up (allocator, kernels)
    med = lambda k: sorted(r[k] for r in timed)[len(timed) // 2]  # noqa: E731
    keys = ("t_rollout", "t_reward", "t_advantage", "t_logprob", "t_update", "t_step", "tokens_per_s",
            "decode_tokens_per_s", "update_tokens_per_s", "response_len", "peak_mem_gb")
    res = {k: med(k) for k in keys}
    shape = f"tiny {args.tiny_hidden}x{args.tiny_layers}" if args.bench_shape == "tiny" else f"Qwen3-{args.bench_shape} shape"
    print0(f"\nbenchmark: {shape}, {d.device}, world {d.world}, {'FSDP2' if args.fsdp else 'DDP' if d.world > 1 else 'one process'}, dtype {args.dtype}, "
           f"grad ckpt {args.grad_ckpt}; {args.prompts_per_step} prompts x G={args.group_size}, max {args.max_new_tokens} "
           f"new tokens; median of {len(timed)} step(s) after the first ({time.time() - t:.0f} s in all)")
    for k in keys:
        print0(f"  {k:22s} {res[k]:12.3f}")
    return res


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if args.demo:
        return demo(args)
    if args.bench:
        return benchmark(args)
    return train(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
