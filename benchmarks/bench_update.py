"""bench_update.py: the update's log-prob memory and micro-batch padding at the paper's shapes (issue 11, items 4-5).

Sections (--sections; both by default). Byte and position counts are exact; wall times depend on the machine.

logprob: a random Qwen3 with Qwen3-1.7B's widths (hidden 2,048, 16 heads, 8 KV heads, head_dim 128,
intermediate 6,144), the real vocabulary (151,936, head tied to the embeddings as in Qwen3-1.7B) and
--layers layers, on CPU in --dtype. One micro-batch of --rows rows (--prompt-tokens prompt tokens, then
T response tokens, for each T in --tokens): the forward and backward of the response log-probs,
loss = sum of log-prob x a fixed random weight, in two ways:
- BEFORE, the plain path written here as the reference: logits of every response position at once,
  log_softmax(logits / temperature), gather the target (what a straightforward implementation does);
- AFTER, train.py's path: `train.response_logprobs` (the LM head in --chunk positions at a time,
  recomputed in the backward: `train.head_logprobs`).
Both run through the same `train.pack_rows` micro-batch and the same model forward (the head replaced by
`train.head_replaced`), so they differ only in the head. Each (path, T) runs in a fresh subprocess with
the parameters' gradient buffers already allocated (as after the first micro-batch of an accumulation)
and prints:
- peak memory: the process's peak resident set (VmHWM, reset just before the forward through
  /proc/self/clear_refs) minus its resident set then, so model, buffers and inputs are not counted;
- saved for backward: the bytes of the unique storages that autograd saves (saved_tensors_hooks),
  parameters excluded, and of them those with a vocabulary-sized dimension (logits and their kin);
- wall time of the forward+backward;
- log-prob and gradient max |AFTER - BEFORE| (every parameter) where both ran.
A BEFORE case whose logits arithmetic (4 copies of rows x T x V floats: logits, log-softmax, and a
gradient of each) exceeds --mem-fraction of MemAvailable is not run; its arithmetic is printed instead.
Next to it, the arithmetic for Qwen3-1.7B's micro-batch of 8 rows in bf16: logits and their gradient,
8 x T x 151,936 x 2 bytes each, against one chunk's [chunk, V] fp32 tensor.

padding: a modelled paper step on one rank of 8: 32 prompts x G = 7 = 224 rows, in mini-batches of
--mini-batch-prompts / --world prompts (train.update_policy's split). Lengths drawn with --seed: a
prompt length per prompt, shared by its G rows, lognormal (median --prompt-median, sigma --prompt-sigma)
clipped to [--prompt-min, 1,024]; response lengths lognormal (median --response-median, sigma
--response-sigma) per row, capped at --max-new-tokens (the rows at the cap are the truncated ones).
BEFORE: each mini-batch's rows split in order into micro-batches of --old-micro-batch-rows rows (train.py's
former --micro-batch-rows 8), each padded to its longest prompt + longest response. AFTER:
`train.plan_micro_batches` with train.py's --micro-batch-tokens / --micro-batch-rows defaults and
--max-padding, packed by `train.pack_rows`; and, to show what the padding bound buys, the same with the
token budget alone (no padding bound: the fewest micro-batches the budget allows). Prints real positions
(prompt + response - 1 per row: the positions that predict a token), padded positions, their ratio, the
number of micro-batches and the largest micro-batch (positions). Then a gradient check on a small random
batch and the tiny random model: train's `accumulate_gradients` (packed rows, token budget, chunked
head) against the BEFORE scheme written here (consecutive rows, prompt left-padded, full logits and
log_softmax), max |difference| over every parameter (tests/test_train.py::
test_gradient_independent_of_micro_batches_and_ranks checks the budget-packed gradient against one
micro-batch).

GB here are 2**30 bytes. The logprob section is compute-bound: the head alone is 3-4 x T x V x 2,048
multiply-adds per case (BEFORE 3, AFTER 4: it recomputes the logits), so on a 2-core CPU the T = 8,192 case
runs for tens of minutes (README's Benchmarks table gives the times measured); `--vocab 8192 --tokens 512 2048`
runs the same code at a small vocabulary in a few minutes.

Run from the repository root:
    python benchmarks/bench_update.py | tee benchmarks/results/bench_update.txt
    python benchmarks/bench_update.py --sections padding
    python benchmarks/bench_update.py --sections logprob --tokens 2048 --layers 2
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import evaluate  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402
from bench_rollout import qwen3_1_7b_shaped  # noqa: E402

SECTIONS = ("logprob", "padding")


@dataclass
class Args:
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    """which sections to run: logprob, padding"""
    threads: int = 2
    """torch CPU threads"""
    # --- logprob
    tokens: list[int] = field(default_factory=lambda: [2048, 8192])
    """logprob: response tokens T per row, one case each"""
    rows: int = 1
    """logprob: rows in the micro-batch"""
    prompt_tokens: int = 16
    """logprob: prompt tokens per row (the head runs on response positions only)"""
    layers: int = 1
    """logprob: decoder layers of the Qwen3-1.7B-shaped random model"""
    vocab: int = 151_936
    """logprob: vocabulary size (Qwen3's; smaller only to try the script quickly)"""
    dtype: str = "float32"
    """logprob: parameter and compute dtype, float32 or bfloat16 (bf16 matmuls are emulated, very slowly, on CPUs
    without AVX-512 BF16 or AMX)"""
    chunk: int = train.Args.logit_chunk
    """logprob: AFTER's token positions per chunk (train.py's --logit-chunk)"""
    temperature: float = 1.0
    """logprob: log-probs of logits / temperature"""
    mem_fraction: float = 0.8
    """logprob: run a BEFORE case only if its logits arithmetic is below this fraction of MemAvailable"""
    case: str | None = None
    """internal: run one logprob case PATH:T (before or after) in this process and print its result as JSON"""
    compare_to: str | None = None
    """internal: with --case, a file of another case's log-probs and gradients to compare against"""
    save_to: str | None = None
    """internal: with --case, write this case's log-probs and gradients here"""
    # --- padding
    prompts: int = 32
    """padding: prompts on the rank (SPEC 7: 256 over 8 ranks)"""
    G: int = train.Args.group_size
    """padding: responses per prompt"""
    world: int = 8
    """padding: ranks the step's prompts are split over (mini-batch rows per rank = mini_batch_prompts / world x G)"""
    mini_batch_prompts: int = train.Args.mini_batch_prompts
    """padding: prompts per optimizer update over all ranks (train.py's --mini-batch-prompts)"""
    max_prompt_tokens: int = train.Args.max_prompt_tokens
    """padding: longest prompt"""
    max_new_tokens: int = train.Args.max_new_tokens
    """padding: response cap (rows reaching it are truncated)"""
    prompt_median: float = 256.0
    """padding: median prompt length"""
    prompt_sigma: float = 0.6
    """padding: sigma of log prompt length"""
    prompt_min: int = 32
    """padding: shortest prompt"""
    response_median: float = 500.0
    """padding: median response length before the cap"""
    response_sigma: float = 0.8
    """padding: sigma of log response length"""
    old_micro_batch_rows: int = 8
    """padding: BEFORE's rows per micro-batch (train.py's former --micro-batch-rows default)"""
    micro_batch_tokens: int = train.Args.micro_batch_tokens
    """padding: AFTER's token budget (train.py's --micro-batch-tokens)"""
    micro_batch_rows: int = train.Args.micro_batch_rows
    """padding: AFTER's most rows per micro-batch (train.py's --micro-batch-rows)"""
    max_padding: float = 0.1
    """padding: AFTER's padding bound, padded positions <= (1 + this) x real (train.plan_micro_batches' default)"""
    seed: int = 0
    """padding: seed of the lengths and of the gradient check's batch"""


# ==============================================================================================
# logprob: BEFORE (plain) and AFTER (train's chunked head) on one micro-batch


def plain_logprobs(model, mb: dict, temperature: float) -> torch.Tensor:
    """BEFORE, the reference: the logits of every valid response position of the micro-batch at once,
    log_softmax, gather. Same packed rows and forward as `train.response_logprobs`; only the head differs."""
    mask = mb["response_mask"]
    targets = mb["response_ids"][mask]  # [N]

    def logprobs(hidden, head):  # hidden [b, L, H] -> [N]
        logits = F.linear(hidden.flatten(0, 1)[mb["head_index"]], head.weight)  # [N, V]
        return torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets[:, None])[:, 0]

    with train.head_replaced(model, logprobs):
        lp = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"],
                   use_cache=False).logits  # [N]
    return torch.zeros(mask.shape, dtype=lp.dtype).masked_scatter(mask, lp)


def random_rows(rows: int, prompt_tokens: int, T: int, vocab: int, seed: int = 0) -> dict:
    """A batch of `rows` rows in rollout's layout, every row `prompt_tokens` + T tokens (random ids, no EOS/pad)."""
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_ids=torch.randint(3, vocab, (rows, prompt_tokens), generator=g),
                prompt_mask=torch.ones(rows, prompt_tokens, dtype=torch.bool),
                response_ids=torch.randint(3, vocab, (rows, T), generator=g),
                response_mask=torch.ones(rows, T, dtype=torch.bool))


def memory_kb() -> tuple[int, int]:
    """(resident set, its peak since the last reset) of this process in kB, from /proc/self/status."""
    vals = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            vals[key] = int(rest.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


@contextlib.contextmanager
def saved_storages(params, vocab: int):
    """Counts what autograd saves for the backward: {"bytes", "vocab_bytes"} over unique storages, parameters
    excluded; vocab_bytes: those of tensors with a vocabulary-sized dimension."""
    seen, skip, out = set(), {p.untyped_storage().data_ptr() for p in params}, {"bytes": 0, "vocab_bytes": 0}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            out["bytes"] += s.nbytes()
            out["vocab_bytes"] += s.nbytes() if vocab in t.shape else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def run_case(args: Args, path: str, T: int) -> dict:
    """One forward+backward of `path` (before | after) at T response tokens, measured as the docstring says."""
    where = types.SimpleNamespace(device="cpu", dtype=args.dtype)  # what bench_rollout's builder reads
    model = qwen3_1_7b_shaped(args.layers, args.vocab, 6144, where).train()
    batch = random_rows(args.rows, args.prompt_tokens, T, args.vocab)
    mb = train.pack_rows(batch, list(range(args.rows)))
    up = torch.randn(mb["response_mask"].shape, generator=torch.Generator().manual_seed(1))  # [b, T] loss weights
    for p in model.parameters():  # the accumulation buffers exist, as from the second micro-batch on
        p.grad = torch.zeros_like(p)
    rss0 = memory_kb()[0]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    t0 = time.perf_counter()
    with saved_storages(list(model.parameters()), args.vocab) as saved:
        if path == "before":
            lp = plain_logprobs(model, mb, args.temperature)
        else:
            lp = train.response_logprobs(model, mb, args.temperature, args.chunk, contextlib.nullcontext())
    (lp * up).sum().backward()
    wall = time.perf_counter() - t0
    res = dict(path=path, T=T, peak_gb=(memory_kb()[1] - rss0) / 2**20, saved_gb=saved["bytes"] / 2**30,
               saved_vocab_gb=saved["vocab_bytes"] / 2**30, wall_s=wall)
    lp = lp.detach()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if args.compare_to:
        other = torch.load(args.compare_to)
        res["lp_diff"] = float((lp - other["lp"]).abs().max())
        res["grad_diff"] = max(float((g - other["grads"][n]).abs().max()) for n, g in grads.items())
        res["grad_max"] = max(float(g.abs().max()) for g in grads.values())
    if args.save_to:
        torch.save({"lp": lp, "grads": grads}, args.save_to)
    return res


def subprocess_case(args: Args, path: str, T: int, compare_to: str | None, save_to: str | None) -> dict | None:
    """run_case in a fresh python, so no case inherits another's allocations; None if it failed (e.g. killed)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{path}:{T}", "--threads", str(args.threads),
           "--rows", str(args.rows), "--prompt-tokens", str(args.prompt_tokens), "--layers", str(args.layers),
           "--vocab", str(args.vocab), "--dtype", args.dtype, "--chunk", str(args.chunk),
           "--temperature", str(args.temperature)]
    cmd += ["--compare-to", compare_to] if compare_to else []
    cmd += ["--save-to", save_to] if save_to else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {path} T={T}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mem_available_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def logprob_section(args: Args) -> None:
    V, b = args.vocab, args.rows
    print(f"\n== log-prob path memory: Qwen3-1.7B widths, {args.layers} layer(s), vocab {V:,} (tied head), "
          f"{args.dtype} weights and compute on CPU ({args.threads} threads); {b} row(s) x ({args.prompt_tokens} "
          f"prompt + T response) tokens; AFTER chunk {args.chunk}; no gradient checkpointing; each case in a fresh "
          f"process; peak = VmHWM (reset before the forward) - VmRSS then")
    print(f"  {'T':>6} {'path':<7} {'peak GB':>8} {'saved GB':>9} {'of it [.., V]':>13} {'wall s':>7} "
          f"{'logits arithmetic (4 x rows x T x V x 4 B)':>44}")
    with tempfile.TemporaryDirectory() as tmp:
        for T in args.tokens:
            need = 4 * b * T * V * 4 / 2**30  # fp32 logits, log-softmax output, and a gradient of each
            ref = os.path.join(tmp, f"before-{T}.pt")
            before = None
            if need < args.mem_fraction * mem_available_gb():
                before = subprocess_case(args, "before", T, None, ref)
            if before:
                print(f"  {T:6d} {'BEFORE':<7} {before['peak_gb']:8.2f} {before['saved_gb']:9.2f} "
                      f"{before['saved_vocab_gb']:13.2f} {before['wall_s']:7.1f} {need:41.2f} GB")
            else:
                print(f"  {T:6d} {'BEFORE':<7} {'not run':>8}: needs about {need:.1f} GB for the logits alone "
                      f"(> {args.mem_fraction:g} x {mem_available_gb():.1f} GB available)")
            after = subprocess_case(args, "after", T, ref if before else None, None)
            if after:
                print(f"  {T:6d} {'AFTER':<7} {after['peak_gb']:8.2f} {after['saved_gb']:9.2f} "
                      f"{after['saved_vocab_gb']:13.2f} {after['wall_s']:7.1f}")
            if before and after:
                print(f"  {'':6} same result: log-prob max |AFTER - BEFORE| {after['lp_diff']:.2e}; gradient max "
                      f"|AFTER - BEFORE| {after['grad_diff']:.2e} (largest |gradient| {after['grad_max']:.2e})")
            with contextlib.suppress(FileNotFoundError):
                os.remove(ref)
    chunk_gb = args.chunk * V * 4 / 2**30
    print(f"  arithmetic, Qwen3-1.7B's micro-batch of 8 rows in bf16: BEFORE holds the logits and their gradient, "
          f"8 x T x {V:,} x 2 B each; AFTER holds [chunk, V] tensors of one chunk ({args.chunk} x {V:,} x 4 B = "
          f"{chunk_gb:.2f} GB in fp32, a few at once) and one [V, H] fp32 gradient sum "
          f"({V * 2048 * 4 / 2**30:.2f} GB), "
          f"whatever T is")
    for T in (2048, 8192):
        print(f"    T = {T:5d}: logits {8 * T * V * 2 / 2**30:5.1f} GB + gradient {8 * T * V * 2 / 2**30:5.1f} GB "
              f"vs one chunk {chunk_gb:.2f} GB")


# ==============================================================================================
# padding: micro-batches of consecutive rows (BEFORE) vs by a token budget (AFTER)


def modelled_lengths(args: Args) -> tuple[list[int], list[int]]:
    """(prompt length, response length) per row, rows grouped by prompt (G each), drawn as the docstring says."""
    g = torch.Generator().manual_seed(args.seed)
    plen = (math.log(args.prompt_median) + args.prompt_sigma * torch.randn(args.prompts, generator=g)).exp()
    plen = plen.round().clamp(args.prompt_min, args.max_prompt_tokens).long().repeat_interleave(args.G)  # [B]
    rlen = (math.log(args.response_median) + args.response_sigma * torch.randn(len(plen), generator=g)).exp()
    rlen = rlen.round().clamp(1, args.max_new_tokens).long()  # [B]
    return plen.tolist(), rlen.tolist()


def batch_of_lengths(plen: list[int], rlen: list[int]) -> dict:
    """Masks (and zero ids) in rollout's layout for the given lengths: prompts left-padded, responses right-padded."""
    Tp, T = max(plen), max(rlen)
    pm = torch.arange(Tp) >= Tp - torch.tensor(plen)[:, None]  # [B, Tp]
    rm = torch.arange(T) < torch.tensor(rlen)[:, None]  # [B, T]
    return dict(prompt_ids=torch.zeros(pm.shape, dtype=torch.long), prompt_mask=pm,
                response_ids=torch.zeros(rm.shape, dtype=torch.long), response_mask=rm)


def old_plan(n: int, rows: int) -> list[list[int]]:
    """BEFORE: consecutive rows, `rows` at a time."""
    return [list(range(s, min(s + rows, n))) for s in range(0, n, rows)]


def count_positions(plen: list[int], rlen: list[int], mini: int, args: Args) -> dict:
    """Positions fed to the model per scheme ([positions, micro-batches, largest micro-batch's positions]),
    micro-batches formed within each mini-batch of `mini` rows: before, after, budget_only."""
    out = {k: [0, 0, 0] for k in ("before", "after", "budget_only")}

    def add(key, n):
        out[key] = [out[key][0] + n, out[key][1] + 1, max(out[key][2], n)]

    for s in range(0, len(plen), mini):
        p, r = plen[s:s + mini], rlen[s:s + mini]
        for rows in old_plan(len(p), args.old_micro_batch_rows):  # [b, Tp + T]: the old micro_batch's layout
            add("before", len(rows) * (max(p[i] for i in rows) + max(r[i] for i in rows)))
        batch = batch_of_lengths(p, r)
        for key, bound in (("after", args.max_padding), ("budget_only", math.inf)):
            for rows in train.plan_micro_batches(train.row_lengths(batch), args.micro_batch_tokens,
                                                 args.micro_batch_rows, bound):
                add(key, train.pack_rows(batch, rows)["input_ids"].numel())
    return out


def padding_section(args: Args) -> None:
    plen, rlen = modelled_lengths(args)
    mini = args.mini_batch_prompts // args.world * args.G
    real = sum(p + r - 1 for p, r in zip(plen, rlen))
    trunc = sum(r == args.max_new_tokens for r in rlen)
    print(f"\n== padding: a modelled step on one rank of {args.world}: {args.prompts} prompts x G={args.G} = "
          f"{len(plen)} rows, mini-batches of {mini} rows ({args.mini_batch_prompts} prompts / {args.world} ranks x "
          f"G); seed {args.seed}\n  prompts lognormal(median {args.prompt_median:g}, sigma {args.prompt_sigma:g}) in "
          f"[{args.prompt_min}, {args.max_prompt_tokens}]: mean {sum(plen) / len(plen):.0f}, max {max(plen)}; "
          f"responses lognormal(median {args.response_median:g}, sigma {args.response_sigma:g}) capped at "
          f"{args.max_new_tokens}: mean {sum(rlen) / len(rlen):.0f}, {trunc} truncated ({trunc / len(rlen):.1%})\n"
          f"  real positions (prompt + response - 1 per row) {real:,}; response tokens {sum(rlen):,}")
    print(f"  {'scheme':<72} {'positions':>9} {'/ real':>7} {'micro-batches':>13} {'largest':>8}")
    res = count_positions(plen, rlen, mini, args)
    budget = f"{args.micro_batch_tokens:,} tokens, <= {args.micro_batch_rows} rows"
    for key, label in (("before", f"BEFORE: {args.old_micro_batch_rows} consecutive rows, padded to longest prompt + "
                                  f"response"),
                       ("after", f"AFTER: plan_micro_batches, {budget}, padding <= {args.max_padding:g}"),
                       ("budget_only", f"  the same without the padding bound: {budget}")):
        n, k, big = res[key]
        print(f"  {label:<72} {n:9,} {n / real:7.3f} {k:13d} {big:8,}")
    gradient_check(args)


def before_gradients(model, batch: dict, N: float, rows: int, a: train.Args) -> None:
    """BEFORE's backward, written independently of train's packing: consecutive rows, [prompt left-padded |
    response right-padded], position ids counted over real tokens, full logits -> log_softmax -> gather."""
    B = batch["A"].shape[0]
    for s in range(0, B, rows):
        mb = {k: v[s:s + rows] for k, v in batch.items()}
        ids = torch.cat([mb["prompt_ids"], mb["response_ids"]], 1)  # [b, Tp + T]
        attn = torch.cat([mb["prompt_mask"], mb["response_mask"]], 1).long()
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        T = mb["response_ids"].shape[1]
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, -T - 1:-1]
        lp = torch.log_softmax(logits.float() / a.temperature, -1).gather(-1, mb["response_ids"][..., None])[..., 0]
        lp = lp * mb["response_mask"]  # [b, T]
        loss, _ = train.policy_loss(lp, mb["old_logp"], mb["A"], mb["response_mask"], mb["weight"], N,
                                    objective=a.objective, clip_low=a.clip_low, clip_high=a.clip_high,
                                    dual_clip=a.dual_clip, agg=a.loss_agg)
        loss.backward()


def gradient_check(args: Args) -> None:
    """The gradient of a small random batch under BEFORE and AFTER (train.accumulate_gradients, a small budget)."""
    model = rollout.build_tiny_model(rollout.build_tiny_tokenizer(), hidden=64, layers=2).train()
    g = torch.Generator().manual_seed(args.seed)
    B, Tp, T, V = 16, 12, 20, model.config.vocab_size
    plen, rlen = torch.randint(2, Tp + 1, (B,), generator=g), torch.randint(1, T + 1, (B,), generator=g)
    batch = batch_of_lengths(plen.tolist(), rlen.tolist())
    batch["prompt_ids"] = torch.randint(3, V, batch["prompt_mask"].shape, generator=g) * batch["prompt_mask"]
    batch["response_ids"] = torch.randint(3, V, batch["response_mask"].shape, generator=g) * batch["response_mask"]
    mask = batch["response_mask"]
    batch.update(A=torch.randn(mask.shape, generator=g) * mask, weight=torch.ones(mask.shape))
    targs = train.Args(micro_batch_tokens=40, micro_batch_rows=64, logit_chunk=7)
    lp = train.batch_logprobs(model, batch, targs, contextlib.nullcontext())
    batch["old_logp"] = (lp + 0.3 * torch.randn(lp.shape, generator=g)) * mask  # ratios != 1: some clip
    N = train.loss_normaliser(mask, batch["weight"], targs.loss_agg, targs.max_new_tokens)
    grads = []
    for fn in (lambda: before_gradients(model, batch, N, 4, targs),
               lambda: train.accumulate_gradients(model, batch, N, targs, 1, contextlib.nullcontext())):
        model.zero_grad(set_to_none=True)
        fn()
        grads.append([p.grad.clone() for p in model.parameters()])
    diff = max(float((a - b).abs().max()) for a, b in zip(*grads))
    big = max(float(a.abs().max()) for a in grads[0])
    k = len(train.plan_micro_batches(train.row_lengths(batch), targs.micro_batch_tokens, targs.micro_batch_rows))
    print(f"  same gradient: {B} random rows (prompts <= {Tp}, responses <= {T}) on the tiny 64x2 model; BEFORE in "
          f"micro-batches of 4 consecutive rows, AFTER {k} micro-batches of <= {targs.micro_batch_tokens} tokens: max "
          f"|AFTER - BEFORE| {diff:.2e} over every parameter (largest |gradient| {big:.2e})")


# ==============================================================================================
# Infrastructure: arguments, the subprocess entry, main


def parse_args(argv: list[str] | None = None) -> Args:
    """Args from the command line; a bad value exits with one line naming the flag."""
    parser = evaluate.dataclass_parser(Args, __doc__.splitlines()[0])
    args = Args(**vars(parser.parse_args(argv)))
    unknown = sorted(set(args.sections) - set(SECTIONS))
    checks = [(not unknown, f"--sections {unknown}: choose from {', '.join(SECTIONS)}"),
              (args.dtype in ("float32", "bfloat16"), f"--dtype {args.dtype!r}: choose from float32, bfloat16"),
              (min(args.tokens + [args.rows, args.prompt_tokens, args.layers, args.vocab, args.chunk, args.threads])
               >= 1, "--tokens, --rows, --prompt-tokens, --layers, --vocab, --chunk and --threads must be >= 1"),
              (args.temperature > 0, f"--temperature {args.temperature}: must be > 0"),
              (args.max_padding >= 0, f"--max-padding {args.max_padding}: must be >= 0"),
              (args.mini_batch_prompts % args.world == 0 and args.prompts % (args.mini_batch_prompts // args.world or 1)
               == 0 and args.mini_batch_prompts >= args.world,
               f"--mini-batch-prompts {args.mini_batch_prompts}: must be a multiple of --world {args.world} that "
               f"divides --prompts {args.prompts} per rank"),
              (min(args.prompts, args.G, args.prompt_min, args.old_micro_batch_rows, args.micro_batch_tokens,
                   args.micro_batch_rows) >= 1 and args.prompt_min <= args.max_prompt_tokens,
               "--prompts, --G, --prompt-min (<= --max-prompt-tokens), --old-micro-batch-rows, --micro-batch-tokens "
               "and --micro-batch-rows must be >= 1"),
              (args.case is None or (args.case.partition(":")[0] in ("before", "after")
                                     and args.case.partition(":")[2].isdigit()),
               f"--case {args.case!r}: PATH:T with PATH before or after")]
    for ok, msg in checks:
        if not ok:
            parser.error(msg)
    return args


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    if args.case:
        path, _, T = args.case.partition(":")
        print(json.dumps(run_case(args, path, int(T))))
        return
    sections = dict(logprob=logprob_section, padding=padding_section)
    for name in args.sections:
        t0 = time.perf_counter()
        sections[name](args)
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(parse_args())
