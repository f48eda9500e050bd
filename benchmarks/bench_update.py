"""bench_update.py: the update's log-prob memory and micro-batch padding at the paper's shapes, on the CPU.

Sections (--sections, both by default):

logprob: one micro-batch's response log-probs, forward and backward (loss: the log-probs times fixed random
weights), on a random Qwen3 with Qwen3-1.7B's widths (hidden 2,048, 16 heads, 8 KV heads, intermediate 6,144),
the real vocabulary (151,936, the head tied to the embeddings) and --layers layers, in fp32; --rows rows of 16
prompt + T response tokens, for each T in --tokens. Two heads on the same `train.pack_rows` micro-batch and the
same `train.response_logprobs` forward, which differ only in the head function:
- plain: every response position's logits at once, log_softmax, the target's entry;
- chunked: `train.head_logprobs` (train.LOGIT_CHUNK positions at a time, recomputed in the backward).
For each it prints the peak of the bytes torch allocated during the forward and backward above what it held
before (from the profiler's allocation events; the parameters' gradient buffers already exist, as from a
mini-batch's second micro-batch on), the bytes saved for the backward (unique storages, parameters excluded) and
of those the ones with a vocabulary-sized dimension, and the wall time; then max |chunked - plain| of the
log-probs and of every parameter's gradient. A plain case whose logits, log-softmax and their gradients
(4 x rows x T x V x 4 bytes) exceed 80% of the available memory is skipped.

padding: a modelled paper step on one rank of 8 (256 prompts x G = 7 over 8 ranks: 32 prompts, 224 rows), in
mini-batches of 64 / 8 prompts (56 rows) as `train.update` splits them. Lengths drawn with --seed: a prompt length
per prompt (its G rows share it), lognormal with median 256 and sigma 0.6, in [32, 1,024]; a response length per
row, lognormal with median 500 and sigma 0.8, capped at 2,048. Each mini-batch's rows go into micro-batches two
ways, both packed by `train.pack_rows`: `train.micro_batches` (train.py's defaults: at most 16,384 positions and 64
rows, longest first) and 8 consecutive rows at a time. Prints the real positions (prompt + response - 1 a row: those
that predict a token), the positions the forwards compute (real + padding), their ratio, the number of
micro-batches and the largest one's positions.

--quick runs the same code at toy widths (hidden 64, vocabulary 4,096; seconds). GiB are 2**30 bytes. The head alone
is 3 (plain) or 4 (chunked: the backward recomputes the logits) x rows x T x V x 2,048 multiply-adds, so on a 2-core
CPU T = 2,048 takes minutes and T = 8,192 tens of minutes.

Run from the repository root:
    python benchmarks/bench_update.py                        # logprob at T = 2,048, then padding
    python benchmarks/bench_update.py --tokens 2048 8192     # also T = 8,192 (plain needs about 19 GB more)
    python benchmarks/bench_update.py --sections padding     # seconds
    python benchmarks/bench_update.py --quick
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from unittest import mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # train.py's directory, and bench_step's
import train  # noqa: E402
from bench_step import SHAPES, random_qwen3  # noqa: E402

WIDTHS = dict(SHAPES["1.7b"], num_hidden_layers=1)
QUICK = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16)
PROMPT_TOKENS, CONSECUTIVE_ROWS, WORLD = 16, 8, 8


# ==============================================================================================
# logprob: the plain head against train's chunked one, on one micro-batch


def plain_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What a straightforward implementation computes: logits [N, V] at once, log_softmax, gather the targets."""
    return torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, targets[:, None])[:, 0]


@contextlib.contextmanager
def measured(params, vocab: int):
    """{"peak", "saved", "saved_vocab"} in bytes, filled when the block ends: the peak of torch's allocations above
    the start (the profiler's [memory] events, exact) and what autograd saves for the backward (unique storages,
    `params` excluded; saved_vocab: those of tensors with a dimension of size `vocab`)."""
    out, seen = dict(peak=0, saved=0, saved_vocab=0), {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            out["saved"] += s.nbytes()
            out["saved_vocab"] += s.nbytes() if vocab in t.shape else 0
        return t

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    live = 0
    for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                       if e.name() == "[memory]"):
        live += n
        out["peak"] = max(out["peak"], live)


def logprob_case(model, mb: dict, head) -> dict:
    """One forward and backward of the response log-probs with `head` in place of train.head_logprobs."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the accumulation buffers exist, as from the second micro-batch on
    weights = torch.randn(mb["response_mask"].shape, generator=torch.Generator().manual_seed(1))  # [b, T]
    with measured(model.parameters(), model.config.vocab_size) as res, mock.patch.object(train, "head_logprobs", head):
        t = time.perf_counter()
        lp = train.response_logprobs(model, mb, contextlib.nullcontext)  # [b, T]
        (lp * weights).sum().backward()
        res["wall_s"] = time.perf_counter() - t
    return dict(res, lp=lp.detach(), grads=[p.grad for p in model.parameters()])


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def logprob(tokens: list[int], rows: int = 1, widths: dict = WIDTHS, vocab: int = 151_936) -> dict:
    """Print and return {T: {"plain": case or None, "chunked": case, "lp_diff", "grad_diff", "grad_max"}}."""
    model, H, gib = random_qwen3(widths, vocab)[0].train(), widths["hidden_size"], 2**30
    print(f"\n== logprob: random Qwen3, hidden {H:,}, {widths['num_hidden_layers']} layer(s), vocabulary {vocab:,} "
          f"(tied head), fp32 on the CPU ({torch.get_num_threads()} thread(s)); {rows} row(s) x ({PROMPT_TOKENS} "
          f"prompt + T response) tokens; chunks of {train.LOGIT_CHUNK} positions\n  {'T':>6} {'head':<8} "
          f"{'peak GiB':>9} {'saved GiB':>10} {'of it [.., V]':>14} {'wall s':>7}")
    out = {}
    for T in tokens:
        g = torch.Generator().manual_seed(T)
        batch = dict(prompt_ids=torch.randint(3, vocab, (rows, PROMPT_TOKENS), generator=g),
                     prompt_mask=torch.ones(rows, PROMPT_TOKENS, dtype=torch.bool),
                     response_ids=torch.randint(3, vocab, (rows, T), generator=g),
                     response_mask=torch.ones(rows, T, dtype=torch.bool))
        mb, need = train.pack_rows(batch, list(range(rows))), 4 * rows * T * vocab * 4
        res = {"plain": logprob_case(model, mb, plain_head) if need < 0.8 * available_bytes() else None}
        if res["plain"] is not None:
            res["plain"]["grads"] = [g.clone() for g in res["plain"]["grads"]]
        res["chunked"] = logprob_case(model, mb, train.head_logprobs)
        for name, c in res.items():
            if c is None:
                print(f"  {T:6d} {name:<8} not run: its logits arithmetic is {need / gib:.1f} GiB, more than 80% of "
                      f"the {available_bytes() / gib:.1f} GiB available")
            else:
                print(f"  {T:6d} {name:<8} {c['peak'] / gib:9.2f} {c['saved'] / gib:10.2f} "
                      f"{c['saved_vocab'] / gib:14.2f} {c['wall_s']:7.1f}")
        if res["plain"] is not None:
            p, c = res["plain"], res["chunked"]
            res.update(lp_diff=float((c["lp"] - p["lp"]).abs().max()),
                       grad_diff=max(float((a - b).abs().max()) for a, b in zip(c["grads"], p["grads"])),
                       grad_max=max(float(a.abs().max()) for a in p["grads"]))
            print(f"  {'':6} same result: log-prob max |chunked - plain| {res['lp_diff']:.1e}, gradient max "
                  f"|chunked - plain| {res['grad_diff']:.1e} over every parameter (largest |gradient| "
                  f"{res['grad_max']:.1e})")
        out[T] = res
    N = train.Args.micro_batch_tokens
    print(f"  on a GPU micro-batch of up to {N:,} response positions (--micro-batch-tokens), plain saves its fp32 "
          f"log-softmax [N, V] for the backward: {N * vocab * 4 / gib:.1f} GiB; chunked saves nothing [.., V] and "
          f"holds one [{train.LOGIT_CHUNK}, V] fp32 chunk at a time ({train.LOGIT_CHUNK * vocab * 4 / gib:.2f} GiB) "
          f"and the head's [V, H] fp32 gradient sum ({vocab * H * 4 / gib:.2f} GiB)")
    return out


# ==============================================================================================
# padding: micro-batches by a token budget (train.micro_batches) against consecutive rows


def modelled_batch(seed: int, prompts: int, G: int) -> dict:
    """Masks (zero ids) in rollout's layout for the modelled lengths: prompts left-padded, responses right-padded."""
    g = torch.Generator().manual_seed(seed)
    plen = (math.log(256) + 0.6 * torch.randn(prompts, generator=g)).exp().round().clamp(32, train.MAX_PROMPT_TOKENS)
    plen = plen.long().repeat_interleave(G)  # [B]
    rlen = (math.log(500) + 0.8 * torch.randn(len(plen), generator=g)).exp().round().clamp(1, 2048).long()  # [B]
    pm = torch.arange(int(plen.max())) >= plen.max() - plen[:, None]  # [B, Tp]
    rm = torch.arange(int(rlen.max())) < rlen[:, None]  # [B, T]
    return dict(prompt_ids=torch.zeros(pm.shape, dtype=torch.long), prompt_mask=pm,
                response_ids=torch.zeros(rm.shape, dtype=torch.long), response_mask=rm)


def padding(seed: int = 0) -> dict:
    """Print and return {"real": positions, "rows", "plans": {name: [rows of each micro-batch]}, "positions":
    {name: [positions of each micro-batch]}}; row indices are the step's."""
    args = train.Args()  # the paper's defaults
    prompts, mini = args.prompts_per_step // WORLD, args.mini_batch_prompts // WORLD * args.group_size
    batch = modelled_batch(seed, prompts, args.group_size)
    B, plen, rlen = len(batch["prompt_mask"]), batch["prompt_mask"].sum(1), batch["response_mask"].sum(1)
    budget, fixed = [], []
    for s in range(0, B, mini):  # train.update's mini-batches
        part = {k: v[s:s + mini] for k, v in batch.items()}
        budget += [[s + i for i in rows] for rows in train.micro_batches(part, args)]
        fixed += [list(range(i, min(i + CONSECUTIVE_ROWS, s + mini))) for i in range(s, s + mini, CONSECUTIVE_ROWS)]
    plans = {f"train.micro_batches: <= {args.micro_batch_tokens:,} positions, <= {args.micro_batch_rows} rows": budget,
             f"{CONSECUTIVE_ROWS} consecutive rows": fixed}
    positions = {k: [train.pack_rows(batch, rows)["input_ids"].numel() for rows in plan] for k, plan in plans.items()}
    real, cap = int((plen + rlen - 1).sum()), int((rlen == 2048).sum())
    print(f"\n== padding: a modelled step on one rank of {WORLD}: {prompts} prompts x G={args.group_size} = {B} rows, "
          f"mini-batches of {mini} rows; seed {seed}\n  prompts: mean {plen.float().mean():.0f}, longest {plen.max()} "
          f"tokens; responses: mean {rlen.float().mean():.0f} tokens, {cap} at the 2,048 cap\n  real positions (prompt "
          f"+ response - 1 a row) {real:,}\n  {'micro-batches':<62} {'positions':>9} {'/ real':>7} {'count':>6} "
          f"{'largest':>8}")
    for name, n in positions.items():
        print(f"  {name:<62} {sum(n):9,} {sum(n) / real:7.3f} {len(n):6d} {max(n):8,}")
    return dict(real=real, rows=B, plans=plans, positions=positions)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=("logprob", "padding"), default=["logprob", "padding"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048], help="logprob: response tokens T per row")
    parser.add_argument("--rows", type=int, default=1, help="logprob: rows in the micro-batch")
    parser.add_argument("--layers", type=int, default=1, help="logprob: decoder layers")
    parser.add_argument("--seed", type=int, default=0, help="padding: seed of the modelled lengths")
    parser.add_argument("--quick", action="store_true", help="logprob at toy widths: hidden 64, vocabulary 4,096")
    a, out = parser.parse_args(argv), {}
    for name in a.sections:
        t = time.perf_counter()
        if name == "logprob":
            widths = dict(QUICK if a.quick else WIDTHS, num_hidden_layers=a.layers)
            out[name] = logprob(a.tokens, a.rows, widths, 4096 if a.quick else 151_936)
        else:
            out[name] = padding(a.seed)
        print(f"  ({name}: {time.perf_counter() - t:.0f} s)", flush=True)
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
