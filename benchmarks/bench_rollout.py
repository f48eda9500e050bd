"""bench_rollout.py: the decode engine's speed, memory and syncs; tree sampling against flat; flat against `generate`.

Sections (--sections; engine, tree, paper, traffic, overhead and arithmetic by default). Token and byte counts are
exact; wall times depend on the machine.

engine: what a decode step costs the host and the GPU, counted on CPU at the paper's 224 rows (tiny Qwen3s of 1 and 2
layers: the counts do not depend on widths): waits for the device per decode step (rollout._read, the only device read;
TorchDispatchMode catches any other inside the step), dispatched ops per layer and outside the layers (views excluded),
and beside them Qwen3-1.7B's memory-bound step on an H100 (arithmetic).

library: transformers' continuous batching (generate_batch) against rollout.sample on the tiny model: whether a prompt
draws the same tokens alone and in a batch of 32 with the same seed, and the wall time of the batch.

recompiles: the compiled decode step (SamplingConfig(compile=True)) after one warm-up rollout per sampler, over rollouts
of other batches, lengths and budgets: how many graphs torch.compile adds (run under TORCH_LOGS=recompiles for why).

tree: for each model it samples P chain questions x G leaves with rollout.sample, flat and tree (at
SamplingConfig's defaults, then at each further --taus value), and with `model.generate`
(do_sample, top_k=0, top_p=1, temperature 1, the same max_new_tokens and EOS), then prints:
- decoded token positions per leaf (rows fed to the model, summed over steps) and wall time per leaf,
  tree / flat as ratios (the target: tree at most 1.0x flat wall time per leaf with >= 40% fewer
  decoded positions); forks and fresh chains per prompt; fork depth; response tokens per leaf (tree
  leaves run longer than flat samples); decode steps (model calls one after another);
- prefilled tokens: rollout prefills each prompt once, so re-prefilled prefix tokens = prefilled -
  sum of prompt lengths (target 0); `generate` prefills every row;
- sampled tokens per second, flat vs generate;
- the same leaves at equal KV budgets (default tau, --budget-page-size): no budget, half of flat's
  unbudgeted peak, and the floor (one group at its longest): wall time per leaf, decode steps and peak
  cache, tree / flat. Where the budget binds, rows wait for pages, and a tree's rows hold fewer of them.
Wall times are medians over `repeats` rounds (seeds 0..repeats-1) after one warm-up, each round running
every sampler once in turn; token counts are means over the same runs. --compile samples with
SamplingConfig(compile=True) (the warm-up run compiles).

The models (--models), because what a tree saves depends on the model's lengths:
- HIDDENxLAYERS, a random tiny Qwen3: its EOS hazard is the same at every position (memoryless), so a
  branch forked at depth t decodes as many further tokens as a fresh sample does, and the tree only
  saves the positions that max_new_tokens cuts off. A floor, not a forecast.
- warm: the tiny 128x4 after train.warm_start on chain (the study's seed-0 recipe: supervised until 30%
  greedy accuracy, cached in --warm-dir; about 2 min on 2 cores the first time). Its responses have
  the task's structure (a solution's length is set by the question, as with a real LM), so a branch
  at depth t decodes about L - t tokens: the case trees are for. It is far more confident than a
  real LM (a few tokens in a thousand above 1 nat), hence the tau sweep.
- a directory: any saved model (rollout.load_model_and_tokenizer).

paper: a random Qwen3 with the real vocabulary (151,936) and Qwen3-1.7B's widths (hidden 2,048, 16
heads, 8 KV heads, head_dim 128, intermediate 6,144) but --paper-layers layers; ragged prompts
(--paper-prompts tokens, random ids) x --paper-G rows, up to --paper-new-tokens new tokens. Random
weights almost never emit EOS, so EOS's logit is raised to give each row a hazard of about
--paper-eos-rate / max_new_tokens per token (ragged lengths, as real responses have). Flat sampling
(--paper-runs) with no budget, at a quarter of every row at its longest (rows x L / 4), at the budget an
80 GB H100 gives Qwen3-1.7B's training (h100) or at default_kv_budget's on this GPU (default), and
`generate` (static cache) on the same rows and logits: pages, budget, allocated and peak cache bytes,
decode steps, ms per step, sampled tokens/s, cache traffic by kind, the fewest steps any schedule could
take at the quarter budget, and on CUDA the peak GPU memory. --compile samples compiled, each config
after an untimed run of itself (which compiles).

traffic: Qwen3-1.7B's attention in 1 layer with a 1,024-token vocabulary and a narrow MLP (the counts
do not depend on them, the run time does), a 1,024-token prompt x 8 rows, EOS impossible, flat and
tree (default tau) at each --traffic-new-tokens: cache bytes written and copied per decoded position,
by kind (prefill writes, decode writes, swaps), from the engine's own counts.

attention: one decode step's attention in one layer of Qwen3-1.7B at the paper's shape (--attention-prompts x G = 7
rows of 1,024 + 2,048 positions, each prompt's pages shared by its rows): rollout._attend (the rows' positions gathered
from the pool, one SDPA call) against SDPA over the same rows laid out contiguously; times, the largest difference,
and the bytes each reads.

overhead: ms per decode step at batch 1 on the tiny 64x2 model (eager, compiled, `generate`).

arithmetic: Qwen3-1.7B's bytes per cached position x rows x length, and how much of it an 80 GB H100
holds after the training state, at 2,048 and 8,192 new tokens (printed, not measured).

Run from the repository root:
    python benchmarks/bench_rollout.py                        # tree: 64x2, 128x4, warm; tau 0.5 (default), 1.0, 0.3, 0.1
    python benchmarks/bench_rollout.py --sections engine library
    python benchmarks/bench_rollout.py --sections tree --models warm --compile
    python benchmarks/bench_rollout.py --sections tree paper --device cuda --dtype bf16
    # the GPU check: Qwen3-1.7B-shaped (28 layers), 224 rows, 1,024 + 2,048 tokens, EOS impossible; then --compile
    python benchmarks/bench_rollout.py --sections paper --device cuda --dtype bf16 --paper-layers 28 \
        --paper-prompts $(printf '1024 %.0s' $(seq 32)) --paper-G 7 --paper-new-tokens 2048 --paper-eos-rate 0 \
        --paper-runs h100 none
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import evaluate  # noqa: E402
import rollout  # noqa: E402


@dataclass
class Args:
    models: list[str] = field(default_factory=lambda: ["64x2", "128x4", "warm"])
    """models: HIDDENxLAYERS (random tiny Qwen3), warm (tiny 128x4 warm-started on chain), or a model directory"""
    taus: list[float] = field(default_factory=lambda: [1.0, 0.3, 0.1])
    """tree tau values to measure besides SamplingConfig's default"""
    P: int = 8
    """prompts (chain test questions) per batch"""
    G: int = 8
    """leaves per prompt (equal for tree and flat)"""
    max_new_tokens: int = 64
    """most tokens per response"""
    repeats: int = 5
    """timed runs per sampler (seeds 0..repeats-1), after one warm-up"""
    device: str = "cpu"
    """cpu or cuda"""
    dtype: str = "fp32"
    """model dtype: fp32 or bf16"""
    threads: int = 2
    """torch CPU threads"""
    warm_dir: str = "runs/bench-rollout-warm"
    """where the `warm` model is cached, as WARM_DIR/warm-s0 (train.warm_start reuses it when the recipe matches)"""
    compile: bool = False
    """tree and paper sections: sample with SamplingConfig(compile=True) (torch.compile; CUDA graphs on CUDA)"""
    sections: list[str] = field(default_factory=lambda: ["engine", "tree", "paper", "traffic", "overhead", "arithmetic"])
    """which sections to run: engine, library, recompiles, tree, paper, traffic, attention, overhead, arithmetic"""
    paper_layers: int = 1
    """paper case: decoder layers of the Qwen3-1.7B-shaped random model"""
    paper_prompts: list[int] = field(default_factory=lambda: [1024, 640, 384, 128])
    """paper case: prompt lengths in tokens (ragged)"""
    paper_G: int = 2
    """paper case: rows per prompt"""
    paper_new_tokens: int = 512
    """paper case: most new tokens per row"""
    paper_eos_rate: float = 4.0
    """paper case: EOS logit raised so a row ends with probability rate / max_new_tokens per token"""
    paper_runs: list[str] = field(default_factory=lambda: ["none", "quarter", "generate"])
    """paper case, in order: none (no budget), quarter (a quarter of rows x L), h100 (what default_kv_budget gives
    Qwen3-1.7B training on an 80 GB H100: the arithmetic section's positions), default (default_kv_budget here, CUDA),
    generate (static cache)"""
    traffic_new_tokens: list[int] = field(default_factory=lambda: [256, 2048])
    """traffic section: max_new_tokens values (EOS impossible, so rows run to them)"""
    attention_prompts: int = 8
    """attention section: prompts, each G = 7 rows of 1,024 + 2,048 positions (the paper's GPU holds 32)"""
    budget_page_size: int = 16
    """tree section, equal budgets: page size (a tiny model's ~80-position row then spans pages as a 3,072-position
    row spans 128-position pages)"""


def parse_args(argv: list[str] | None = None) -> Args:
    args = Args(**vars(evaluate.dataclass_parser(Args, __doc__.splitlines()[0]).parse_args(argv)))
    for m in args.models:
        parts = m.split("x")
        if m != "warm" and not os.path.isdir(m) and not (len(parts) == 2 and all(x.isdigit() for x in parts)):
            raise ValueError(f"--models: {m!r} is not HIDDENxLAYERS (e.g. 128x4), warm, or a model directory")
    if min(args.P, args.G, args.max_new_tokens, args.repeats) < 1:
        raise ValueError("--P, --G, --max-new-tokens and --repeats must be >= 1")
    if any(t < 0 for t in args.taus):
        raise ValueError(f"--taus {args.taus}: tau must be >= 0 nats")
    names = ("engine", "library", "recompiles", "tree", "paper", "traffic", "attention", "overhead", "arithmetic")
    if set(args.sections) - set(names):
        raise ValueError(f"--sections {sorted(set(args.sections) - set(names))}: choose from {', '.join(names)}")
    if min(args.paper_layers, args.paper_G, args.paper_new_tokens, *args.paper_prompts, *args.traffic_new_tokens) < 1:
        raise ValueError("--paper-layers, --paper-G, --paper-new-tokens, --paper-prompts and --traffic-new-tokens must be >= 1")
    runs = {"none", "quarter", "h100", "default", "generate"}
    if set(args.paper_runs) - runs or len(set(args.paper_runs)) < len(args.paper_runs):
        raise ValueError(f"--paper-runs {args.paper_runs}: each at most once, from {sorted(runs)}")
    if "default" in args.paper_runs and args.device != "cuda":
        raise ValueError("--paper-runs default: default_kv_budget reads free CUDA memory; use --device cuda")
    if args.paper_eos_rate < 0 or args.paper_eos_rate >= args.paper_new_tokens:
        raise ValueError(f"--paper-eos-rate {args.paper_eos_rate}: must be in [0, --paper-new-tokens)")
    return args


def load(name: str, args: Args):
    """(model, tokenizer, label) for one --models entry."""
    dtype = rollout.DTYPES[args.dtype]
    if name == "warm":
        import study  # benchmarks/study.py, beside this file: its seed-0 warm start is the recipe
        import train
        name = train.warm_start(train.parse_args(study.warm_flags(study.Args(out=args.warm_dir), 0)))
        label = f"warm-started 128x4 on chain ({name})"
    elif os.path.isdir(name):
        label = name
    else:
        hidden, layers = map(int, name.split("x"))
        tok = rollout.build_tiny_tokenizer()
        return rollout.build_tiny_model(tok, hidden=hidden, layers=layers).to(args.device, dtype).eval(), tok, \
            f"random tiny Qwen3 {name}"
    model, tok = rollout.load_model_and_tokenizer(name, device=args.device, dtype=dtype)
    return model.eval(), tok, label


def timed(fns: dict, repeats: int) -> dict:
    """{name: (median wall seconds, outputs)}: one warm-up each, then `repeats` rounds that run every fn
    once in turn (seed = round), so a slow spell of the machine hits all of them alike."""
    for fn in fns.values():
        fn(0)
    walls, outs = {k: [] for k in fns}, {k: [] for k in fns}
    for seed in range(repeats):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[k].append(fn(seed))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            walls[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(walls[k]), outs[k]) for k in fns}


def tree_vs_flat(args: Args) -> None:
    """The tree section: tree (tau sweep) vs flat vs generate on each --models entry."""
    P, G, B = args.P, args.G, args.P * args.G
    default_tau = rollout.SamplingConfig().tau
    taus = [default_tau] + [t for t in args.taus if t != default_tau]
    print(f"\n== tree vs flat: device={args.device} dtype={args.dtype} threads={args.threads} P={P} G={G} "
          f"max_new_tokens={args.max_new_tokens} repeats={args.repeats} compile={args.compile}; "
          f"tree defaults: {rollout.SamplingConfig(sampler='tree')}")
    for name in args.models:
        model, tok, label = load(name, args)
        prompts = [evaluate.prompt_ids("chain", ex, tok) for ex in evaluate.load_examples("chain", "test", limit=P)]
        prompt_tokens = sum(map(len, prompts))
        eos, pad = tok.eos_token_id, tok.pad_token_id

        def run(sampler, tau=default_tau):
            cfg = rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, sampler=sampler, tau=tau, compile=args.compile)
            return lambda seed: rollout.sample(model, prompts, G, cfg, eos_token_ids=eos, pad_token_id=pad, seed=seed)

        # generate on the same rows: each prompt repeated G times, left-padded
        Tp = max(map(len, prompts))
        ids = torch.tensor([[pad] * (Tp - len(q)) + q for q in prompts for _ in range(G)], device=args.device)
        lens = torch.tensor([len(q) for q in prompts for _ in range(G)], device=args.device)
        mask = (torch.arange(Tp, device=args.device) >= Tp - lens[:, None]).long()

        def gen(seed):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                     temperature=1.0, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                     pad_token_id=pad)
            is_eos = (out[:, Tp:] == eos).long()
            return int(((is_eos.cumsum(1) - is_eos) == 0).sum())  # tokens up to and including the first EOS

        res = timed({"flat": run("flat"), "generate": gen, **{tau: run("tree", tau) for tau in taus}}, args.repeats)
        wall_flat, flat = res["flat"]
        dec_flat = statistics.fmean([r.decoded_tokens for r in flat]) / B
        tok_flat = statistics.fmean([int(r.response_mask.sum()) for r in flat]) / B
        H = torch.cat([r.entropy[r.response_mask] for r in flat])
        print(f"\n[{label}] {sum(p.numel() for p in model.parameters()):,} parameters; flat samples: "
              f"{tok_flat:.1f} tokens/leaf, entropy median {H.median():.3f} nat, "
              + ", ".join(f"{float((H > t).float().mean()):.2%} > {t:g}" for t in taus))
        print(f"  {'sampler':<20} {'decoded/leaf':>12} {'tree/flat':>9} {'fewer':>6} {'wall ms/leaf':>12} {'tree/flat':>9} "
              f"{'forks/prompt':>12} {'fresh/prompt':>12} {'fork depth':>10} {'tokens/leaf':>11} {'tree/flat':>9} "
              f"{'re-prefilled':>12} {'decode steps':>12}")
        print(f"  {'flat':<20} {dec_flat:12.2f} {'':>9} {'':>6} {1e3 * wall_flat / B:12.3f} {'':>9} {'':>12} {'':>12} "
              f"{'':>10} {tok_flat:11.2f} {'':>9} {flat[0].prefilled_tokens - prompt_tokens:12d} "
              f"{statistics.fmean([r.decode_steps for r in flat]):12.1f}")
        for tau in taus:
            wall_tree, tree = res[tau]
            dec_tree = statistics.fmean([r.decoded_tokens for r in tree]) / B
            tok_tree = statistics.fmean([int(r.response_mask.sum()) for r in tree]) / B
            forks = statistics.fmean([float(r.forks_made.float().mean()) for r in tree])
            # leaves that are neither a root chain nor a branch: fresh chains started when no row could fork
            fresh = statistics.fmean([(int((r.parent < 0).sum()) - min(G, rollout.SamplingConfig().num_chains) * P) / P for r in tree])
            branch_pos = torch.cat([r.branch_pos[r.parent >= 0] for r in tree]).float()
            depth = float(branch_pos.mean()) if len(branch_pos) else float("nan")  # over every branch of every run
            tag = f"tree tau={tau:g}" + (" (default)" if tau == default_tau else "")
            print(f"  {tag:<20} {dec_tree:12.2f} {dec_tree / dec_flat:9.3f} {1 - dec_tree / dec_flat:6.1%} "
                  f"{1e3 * wall_tree / B:12.3f} {wall_tree / wall_flat:9.3f} {forks:12.2f} {fresh:12.2f} {depth:10.1f} "
                  f"{tok_tree:11.2f} {tok_tree / tok_flat:9.3f} {tree[0].prefilled_tokens - prompt_tokens:12d} "
                  f"{statistics.fmean([r.decode_steps for r in tree]):12.1f}")
        wall_gen, gen_tokens = res["generate"]
        print(f"  prefill: rollout {flat[0].prefilled_tokens} tokens (prompt tokens {prompt_tokens}), generate {int(mask.sum())}")
        print(f"  sampled tokens/s: flat {tok_flat * B / wall_flat:9.0f}  generate {statistics.fmean(gen_tokens) / wall_gen:9.0f}  "
              f"flat/generate {(tok_flat * B / wall_flat) / (statistics.fmean(gen_tokens) / wall_gen):.2f}")
        tree_vs_flat_at_equal_budgets(model, prompts, eos, pad, args)


def tree_vs_flat_at_equal_budgets(model, prompts, eos, pad, args: Args) -> None:
    """Tree (default tau) and flat with the same kv_budget: none, half of flat's unbudgeted peak, the floor."""
    G, B, page = args.G, args.P * args.G, args.budget_page_size

    def run(sampler, budget):
        cfg = rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, sampler=sampler, kv_budget=budget,
                                     page_size=page, compile=args.compile)
        return lambda seed: rollout.sample(model, prompts, G, cfg, eos_token_ids=eos, pad_token_id=pad, seed=seed)

    floor = (rollout.group_pages(max(map(len, prompts)), G, args.max_new_tokens, page) + 1) * page
    need = statistics.fmean(r.peak_kv_tokens for r in [run("flat", None)(seed) for seed in range(args.repeats)])
    print(f"  equal budgets (page_size {page}; flat's unbudgeted peak {need:,.0f} positions, the floor {floor:,}):")
    print(f"  {'kv_budget':>20} {'wall ms/leaf flat':>17} {'tree':>7} {'tree/flat':>9} {'steps flat':>10} {'tree':>6} "
          f"{'peak flat':>9} {'tree':>6}")
    for label, budget in [("none", None), ("half", max(floor, int(need / 2) // page * page)), ("floor", floor)]:
        res = timed({"flat": run("flat", budget), "tree": run("tree", budget)}, args.repeats)
        (wf, flat), (wt, tree) = res["flat"], res["tree"]
        mean = lambda rs, key: statistics.fmean(getattr(r, key) for r in rs)  # noqa: E731
        print(f"  {label + (f' {budget:,}' if budget else ''):>20} {1e3 * wf / B:17.3f} {1e3 * wt / B:7.3f} {wt / wf:9.3f} "
              f"{mean(flat, 'decode_steps'):10.1f} {mean(tree, 'decode_steps'):6.1f} {mean(flat, 'peak_kv_tokens'):9,.0f} "
              f"{mean(tree, 'peak_kv_tokens'):6,.0f}")




# ----------------------------------------------------------------------------------------------
# The engine at the paper's shapes: memory, traffic, host overhead


PAD, EOS = 0, 2  # token ids of the random Qwen3-1.7B-shaped models (random prompts avoid both)


def qwen3_1_7b_shaped(layers: int, vocab: int, intermediate: int, args: Args):
    """A random Qwen3 with Qwen3-1.7B's attention (hidden 2,048, 16 heads, 8 KV heads, head_dim 128), `layers` layers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=2048, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960,
                         tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    model.generation_config.do_sample = False
    return model.to(args.device, rollout.DTYPES[args.dtype]).eval()


def random_prompts(lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def eos_bias(model, prompt: list[int], hazard: float) -> torch.Tensor:
    """A logit bias [V] that gives EOS probability about `hazard` per token (from the logits after `prompt`; a random
    model's logits barely move along a response), or makes it impossible (hazard 0)."""
    V = model.config.vocab_size
    bias = torch.zeros(V, device=next(model.parameters()).device)
    if hazard == 0:
        bias[EOS] = float("-inf")
        return bias
    with torch.no_grad():
        z = model(input_ids=torch.tensor([prompt], device=bias.device)).logits[0, -1].float()
    others = torch.logsumexp(torch.cat([z[:EOS], z[EOS + 1:]]), 0)
    bias[EOS] = others + math.log(hazard / (1 - hazard)) - z[EOS]
    return bias


def wall(fn):
    """(seconds, fn())"""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def generate_rows(model, prompts: list[list[int]], G: int, max_new: int, seed: int = 0):
    """`generate` on the same rows (each prompt G times, left-padded), static cache: tokens up to the first EOS."""
    dev = next(model.parameters()).device
    Tp = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (Tp - len(q)) + q for q in prompts for _ in range(G)], device=dev)
    lens = torch.tensor([len(q) for q in prompts for _ in range(G)], device=dev)
    mask = (torch.arange(Tp, device=dev) >= Tp - lens[:, None]).long()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=PAD, cache_implementation="static")
    is_eos = (out[:, Tp:] == EOS).long()
    return int(((is_eos.cumsum(1) - is_eos) == 0).sum()), out.shape[1] - Tp  # sampled tokens, steps


def paper_case(args: Args) -> None:
    """Flat sampling on the Qwen3-1.7B-shaped model with the real vocabulary: no budget, a quarter of it, generate."""
    model = qwen3_1_7b_shaped(args.paper_layers, 151_936, 6144, args)
    prompts, G, T = random_prompts(args.paper_prompts, 151_936), args.paper_G, args.paper_new_tokens
    bias = eos_bias(model, prompts[-1], args.paper_eos_rate / T)
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias.to(out.dtype))
    rows, L = len(prompts) * G, max(args.paper_prompts) + T
    bpp = rollout.kv_bytes_per_position(model)
    print(f"\n== paper-shaped case: Qwen3-1.7B widths, {args.paper_layers} layer(s), vocab 151,936, {args.dtype}; "
          f"prompts {args.paper_prompts} x G={G} = {rows} rows; max_new_tokens {T}; EOS hazard {args.paper_eos_rate:g}/{T} "
          f"a token\n  cache: {bpp:,} bytes per position ({args.paper_layers} layer(s)); a row reaches at most L = {L} "
          f"positions; pages of {rollout.SamplingConfig.page_size}")

    def run(budget):
        cfg = rollout.SamplingConfig(max_new_tokens=T, kv_budget=budget, compile=args.compile)
        if args.compile:  # the same config once untimed: it compiles (the step's shapes depend on the budget)
            rollout.sample(model, prompts, G, cfg, eos_token_ids=EOS, pad_token_id=PAD, seed=0)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return rollout.sample(model, prompts, G, cfg, eos_token_ids=EOS, pad_token_id=PAD, seed=0)

    rollout.sample(model, prompts[-1:], 1, rollout.SamplingConfig(max_new_tokens=2), eos_token_ids=EOS, pad_token_id=PAD)
    quarter = rows * L // 4  # a quarter of every row at its longest (what a cache of one slot per row allocates)
    budgets = {"none": ("no budget", None), "quarter": ("1/4 budget", quarter), "h100": ("H100 budget", h100_budget()["positions"])}
    if "default" in args.paper_runs:
        budgets["default"] = ("default budget", rollout.default_kv_budget(model, rows, longest=L))
    res, gpu = {}, {}
    for name in args.paper_runs:
        if name == "generate":
            t_gen, (gen_tokens, gen_steps) = wall(lambda: generate_rows(model, prompts, G, T))
            continue
        label, budget = budgets[name]
        res[label] = (budget, *wall(lambda: run(budget)))
        if args.device == "cuda":
            gpu[label] = torch.cuda.max_memory_allocated() / 2**30
    print(f"  {'run':<18} {'pages':>5} {'budget MB':>9} {'alloc MB':>8} {'peak MB':>7} {'steps':>6} {'ms/step':>8} "
          f"{'tokens':>6} {'tokens/s':>8} {'vs first':>8}" + (f" {'GPU peak GiB':>12}" if gpu else ""))
    base = None
    for name, (budget, t, r) in res.items():
        tokens = int(r.response_mask.sum())
        base = base or tokens / t
        print(f"  {name:<18} {r.kv_capacity // rollout.SamplingConfig.page_size:5d} {budget * bpp / 2**20 if budget else float('nan'):9.1f} "
              f"{r.kv_capacity * bpp / 2**20:8.1f} {r.peak_kv_tokens * bpp / 2**20:7.1f} {r.decode_steps:6d} "
              f"{1e3 * t / max(r.decode_steps, 1):8.1f} {tokens:6d} {tokens / t:8.1f} {tokens / t / base:8.2f}"
              + (f" {gpu[name]:12.1f}" if gpu else ""))
    if "generate" in args.paper_runs:
        print(f"  {'generate (static)':<18} {'':>5} {'':>9} {'':>8} {'':>7} {gen_steps:6d} {1e3 * t_gen / gen_steps:8.1f} "
              f"{gen_tokens:6d} {gen_tokens / t_gen:8.1f}")
        if base:
            print(f"  {next(iter(res))} / generate tokens/s: {base / (gen_tokens / t_gen):.2f}")
    print(f"  ms/step includes the prefills{' (compiled: after an untimed run that compiles)' * args.compile}; peak = most "
          "pages in use; alloc = pages x page size, never above the budget; GPU peak = torch.cuda.max_memory_allocated")
    for name, (budget, t, r) in res.items():
        print(f"  cache bytes per decoded position ({name}): "
              + ", ".join(f"{k} {v * bpp / r.decoded_tokens:,.0f}" for k, v in r.kv_traffic.items()))
    if "no budget" in res and "1/4 budget" in res:
        lengths = res["no budget"][2].response_mask.sum(1).tolist()
        for shared in (False, True):
            steps = paged_steps_bound([len(q) for q in prompts], G, lengths, quarter, shared)
            print(f"  any schedule at the 1/4 budget with pages of one position{', prompts shared by their G rows' * shared}"
                  f": at least {steps} decode steps (this engine: {res['1/4 budget'][2].decode_steps})")


def paged_steps_bound(prompt_lens: list[int], G: int, lengths: list[int], budget: int, shared: bool) -> int:
    """The fewest decode steps any schedule needs if the cache held exactly the positions in use (pages of one
    position): every step holds at most `budget` positions, and a row at response position t holds Tp + t.
    So steps >= (sum over rows and steps of positions held) / budget, and >= the longest row. With `shared`,
    a prompt's positions are held once for its G rows, for as long as its longest row runs."""
    rows = [(prompt_lens[i // G], n) for i, n in enumerate(lengths)]
    held = sum(n * (n + 1) // 2 for _, n in rows)  # the responses' own positions
    if shared:
        held += sum(prompt_lens[g] * max(lengths[g * G:(g + 1) * G]) for g in range(len(prompt_lens)))
    else:
        held += sum(tp * n for tp, n in rows)
    return max(max(lengths), -(-held // budget))


def traffic(args: Args) -> None:
    """Cache bytes written and copied per decoded position, flat and tree, at each --traffic-new-tokens."""
    model = qwen3_1_7b_shaped(1, 1024, 1024, args)
    prompts, G = random_prompts([1024], 1024), 8
    bias = eos_bias(model, prompts[0], 0.0)
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias.to(out.dtype))
    bpp, bpp_full = rollout.kv_bytes_per_position(model), 28 * 2 * 8 * 128 * 2
    print(f"\n== cache traffic: Qwen3-1.7B attention, 1 layer ({bpp:,} bytes per position; Qwen3-1.7B in bf16: 28 layers, "
          f"{bpp_full:,}), a 1,024-token prompt x G={G}, EOS impossible\n"
          f"  bytes per decoded position (Qwen3-1.7B bf16 bytes in brackets); decode = one position written per "
          f"computed slot and step")
    print(f"  {'sampler':<8} {'new tokens':>10} {'decoded':>8} {'steps':>6} {'prefill':>16} {'decode writes':>16} "
          f"{'swaps':>16} {'peak MB':>8}")
    for T in args.traffic_new_tokens:
        for sampler in ("flat", "tree"):
            cfg = rollout.SamplingConfig(max_new_tokens=T, sampler=sampler)
            r = rollout.sample(model, prompts, G, cfg, eos_token_ids=EOS, pad_token_id=PAD, seed=0)
            per = {k: v / r.decoded_tokens for k, v in r.kv_traffic.items()}
            cells = " ".join(f"{per[k] * bpp:7,.0f} [{per[k] * bpp_full / 1e3:5.0f}k]" for k in
                             ("prefill", "decode", "swap"))
            print(f"  {sampler:<8} {T:10d} {r.decoded_tokens:8d} {r.decode_steps:6d} {cells} "
                  f"{r.peak_kv_tokens * bpp / 2**20:8.1f}")


def attention(args: Args) -> None:
    """One decode step's attention in one layer at the paper's shape: rollout._attend (the rows' positions gathered from
    the pool, one SDPA call) against SDPA over the same rows laid out contiguously, every row at its longest."""
    P, G, L, page, (Hkv, H, D) = args.attention_prompts, 7, 1024 + 2048, rollout.SamplingConfig.page_size, (8, 16, 128)
    dev, dtype, n = args.device, rollout.DTYPES[args.dtype], args.attention_prompts * 7
    J, Jp = L // page, 1024 // page  # pages per row; the prompt's, shared by the group's G rows
    u = P * Jp + n * (J - Jp)  # pages in use
    g = torch.Generator(device=dev).manual_seed(0)
    pool = torch.randn(1, 2, page, u + 1, Hkv, D, generator=g, device=dev, dtype=dtype)  # + the scratch page
    tables = torch.tensor([[p // G * Jp + i for i in range(Jp)] + [P * Jp + p * (J - Jp) + i for i in range(J - Jp)]
                           for p in range(n)], device=dev)  # [n, J] row p's pages, in order
    at = torch.arange(L, device=dev)
    read = tables[:, at // page] + at % page * (u + 1)  # [n, L] every position seen
    S = page * (u + 1)  # K's slots, then V's
    view = rollout._View(pool.flatten(0, 3), S, torch.stack((read[:, -1:], read[:, -1:] + S)),
                         torch.cat((read.flatten(), read.flatten() + S)), torch.zeros(n, 1, 1, L, device=dev, dtype=dtype))
    q, k, v = (torch.randn(n, h, 1, D, generator=g, device=dev, dtype=dtype) for h in (H, Hkv, Hkv))
    layer = type("Layer", (), {"layer_idx": 0})()
    paged = lambda: rollout._attend(layer, q, k, v, None, scaling=D ** -0.5, page_kv=view)[0]  # noqa: E731
    paged()  # writes k, v at the last position, which the contiguous copy below then holds too
    Kc, Vc = (pool[0, x].flatten(0, 1)[read].transpose(1, 2) for x in (0, 1))  # [n, Hkv, L, D] contiguous rows
    dense = lambda: F.scaled_dot_product_attention(q, Kc, Vc, scale=D ** -0.5, enable_gqa=True)  # noqa: E731
    diff = float((paged().transpose(1, 2) - dense()).abs().max())
    res = {name: statistics.median(wall(fn)[0] for _ in range(args.repeats)) for name, fn in (("paged", paged),
                                                                                             ("dense", dense))}
    item = torch.finfo(dtype).bits // 8
    cache, rows = 2 * u * page * Hkv * D * item, 2 * n * L * Hkv * D * item
    print(f"\n== attention, 1 layer of Qwen3-1.7B ({H} heads on {Hkv} KV heads, head_dim {D}), {args.dtype}, {P} prompts x "
          f"G={G} = {n} rows of {L:,} positions (prompt 1,024 shared), pages of {page}; median of {args.repeats}\n"
          f"  rollout._attend {1e3 * res['paged']:.1f} ms (gather + SDPA), SDPA over contiguous rows "
          f"{1e3 * res['dense']:.1f} ms, ratio {res['paged'] / res['dense']:.2f}; largest difference {diff:.1e}\n"
          f"  bytes: the pages hold {cache / 2**20:,.0f} MiB (each prompt once); the gather reads each row's positions "
          f"({rows / 2**20:,.0f} MiB, each prompt G times), writes them and SDPA reads them again: "
          f"{3 * rows / 2**20:,.0f} MiB, {3 * rows / cache:.1f}x the pages")


def host_overhead(args: Args) -> None:
    """ms per decode step at batch 1 on the tiny 64x2 model: what a step costs besides its arithmetic."""
    tok = rollout.build_tiny_tokenizer()
    model = rollout.build_tiny_model(tok, hidden=64, layers=2).to(args.device).eval()
    bias = torch.zeros(model.config.vocab_size, device=args.device)
    bias[tok.eos_token_id] = float("-inf")
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    q, T = [tok("12+34=").input_ids], 256
    print(f"\n== host overhead: tiny 64x2, batch 1, {T} new tokens (EOS impossible), median of 3 after a warm-up")
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = rollout.SamplingConfig(max_new_tokens=T, compile=compile_)
        fn = lambda: rollout.sample(model, q, 1, cfg, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # noqa: E731
        fn()
        t = statistics.median(wall(fn)[0] for _ in range(3))
        print(f"  rollout.sample {name:<9} {1e3 * t / (T - 1):6.3f} ms/step")
    ids = torch.tensor(q, device=args.device)
    fn = lambda: model.generate(input_ids=ids, do_sample=True, top_k=0, max_new_tokens=T, pad_token_id=0)  # noqa: E731
    fn()
    t = statistics.median(wall(fn)[0] for _ in range(3))
    print(f"  generate (dynamic cache) {1e3 * t / T:6.3f} ms/step")


def engine_counts(args: Args) -> None:
    """Waits for the device per decode step and dispatched ops per layer per step, counted on CPU, beside Qwen3-1.7B's
    memory-bound step on an H100 (arithmetic). The paper's 224 rows (32 prompts x G = 7) on tiny Qwen3s of 1 and 2
    layers (the counts do not depend on widths), pages of 16 (a 40-token row crosses pages as a 3,072-position row
    crosses pages of 128), EOS about 1 in 16 a token (rows end along the way), flat and tree."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):  # ops the decode step dispatches (views excluded: they launch nothing)
        def __init__(self):
            super().__init__()
            self.n, self.attention, self.inside, self.scalar = 0, 0, False, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.n, self.attention = self.n + 1, self.attention + self.inside
            self.scalar += func is torch.ops.aten._local_scalar_dense.default  # a read that waits, inside the step
            return func(*args, **(kwargs or {}))

    tok, counts = rollout.build_tiny_tokenizer(), {}
    step, attend, read = rollout._decode, rollout._attend, rollout._read
    for sampler in ("flat", "tree"):
        for layers in (1, 2):
            model = rollout.build_tiny_model(tok, layers=layers).eval()
            bias = torch.zeros(model.config.vocab_size)
            bias[tok.eos_token_id] = 2.5  # about 1 in 16
            model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
            mode, reads = Ops(), []

            def counted_attend(*a, **k):
                mode.inside = True
                try:
                    return attend(*a, **k)
                finally:
                    mode.inside = False

            def counted_step(*a, **k):
                with mode:
                    return step(*a, **k)

            rollout._decode, rollout._attend, rollout._read = counted_step, counted_attend, lambda x: reads.append(1) or read(x)
            try:
                r = rollout.sample(model, [tok(f"{i}+{2 * i + 7}=").input_ids for i in range(32)], 7,
                                   rollout.SamplingConfig(max_new_tokens=40, sampler=sampler, page_size=16),
                                   eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            finally:
                rollout._decode, rollout._attend, rollout._read = step, attend, read
            counts[sampler, layers] = (mode.n / r.decode_steps, mode.attention / r.decode_steps, len(reads), r, mode.scalar)
    print("\n== the decode engine, counted on CPU: 224 rows (32 prompts x G = 7), tiny Qwen3s of 1 and 2 layers, "
          "pages of 16, up to 40 new tokens, EOS about 1 in 16")
    h = h100_budget()
    for sampler in ("flat", "tree"):
        (one, _, _, _, _), (two, att, reads, r, scalar) = counts[sampler, 1], counts[sampler, 2]
        layer, outside = two - one, 2 * one - two
        steps, prefills = r.decode_steps, reads - r.decode_steps
        print(f"  {sampler}: {steps} decode steps, {reads} waits for the device ({prefills} at prefills): "
              f"{(reads - prefills) / steps:.2f} a decode step, {scalar} inside the step; dispatched ops a step "
              f"(views excluded): {layer:.0f} a layer ({att / 2:.0f} in attention), {outside:.0f} outside the layers; "
              f"Qwen3-1.7B's 28 layers: {28 * layer + outside:,.0f} launches a step")
    bpp, W = h["bpp"], 2 * h["params"]  # bf16 weights, read once a step
    print(f"  Qwen3-1.7B on an H100 (3.35 TB/s), 224 rows, memory-bound step = bytes / bandwidth: weights {W / 1e9:.1f} GB, "
          f"the cache {bpp:,} bytes a position")
    for L in (1024, 1024 + 2048):
        ideal = (32 * 1024 + ROWS * (L - 1024)) * bpp  # each prompt once, each row's own positions once
        gather = 3 * ROWS * L * bpp  # this engine: each row's positions gathered (read, written) and read by SDPA
        print(f"    rows at {L:,} positions: {(W + ideal) / 3.35e12 * 1e3:5.1f} ms reading the cache once "
              f"({ideal / 1e9:.1f} GB), {(W + gather) / 3.35e12 * 1e3:5.1f} ms with the gather ({gather / 1e9:.1f} GB)")


def recompiles(args: Args) -> None:
    """SamplingConfig(compile=True) on the tiny 64x2 model: one warm-up rollout per sampler, then rollouts of other
    batches, lengths and budgets (groups swapped out and back in): the compiled step's graphs before and after. Run
    under TORCH_LOGS=recompiles to see each recompile and its cause."""
    tok = rollout.build_tiny_tokenizer()
    model = rollout.build_tiny_model(tok).eval()
    graphs = lambda: len(torch._dynamo.eval_frame._debug_get_cache_entry_list(rollout._decode.__code__))  # noqa: E731
    prompts = [tok(f"{i}+{2 * i + 7}=").input_ids for i in range(32)]
    print("\n== recompiles: the compiled decode step, tiny 64x2; graphs = torch.compile's entries for rollout._decode")
    for sampler in ("flat", "tree"):
        run = lambda P, G, T, budget=None: rollout.sample(  # noqa: E731
            model, prompts[:P], G, rollout.SamplingConfig(max_new_tokens=T, sampler=sampler, kv_budget=budget,
                                                          page_size=16, compile=True),
            eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        run(2, 2, 8)
        before, t1 = graphs(), time.perf_counter()
        swaps = sum(run(P, G, T, b).kv_traffic["swap"] for P, G, T, b in ((32, 8, 8, None), (5, 7, 40, None),
                                                                         (8, 4, 24, 16 * 40), (1, 2, 3, None)))
        print(f"  {sampler}: warm-up {t1 - t0:.0f} s, {before} graph(s) after it; four more rollouts (1 to 32 prompts, "
              f"G 2 to 8, 3 to 40 new tokens, a budget that swapped {swaps:,} positions) in {time.perf_counter() - t1:.1f} s:"
              f" {graphs() - before} graph(s) more")


def library(args: Args) -> None:
    """transformers' continuous batching (generate_batch: paged cache, block sharing, forks by num_return_sequences)
    against rollout.sample, tiny 64x2 model, 32 prompts x G = 8, 8 new tokens: does a prompt draw the same tokens alone
    and in a batch with the same seed (the guarantee rollout keeps), and the wall time of the batch."""
    import logging

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    tok = rollout.build_tiny_tokenizer()
    model = rollout.build_tiny_model(tok).eval()
    prompts, G, T = [tok(f"{i}+{2 * i + 7}=").input_ids for i in range(32)], 8, 8
    gen = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=T, num_return_sequences=G,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def lib(ps):  # prompt 0's G samples (its request and its forks), as a set: the order of forks is the library's
        cb = ContinuousBatchingConfig(num_blocks=512, page_size=16, max_batch_tokens=4096, return_logprobs=True, seed=0)
        out = model.generate_batch(ps, generation_config=gen, continuous_batching_config=cb, warmup=False)
        return sorted(tuple(o.generated_tokens) for k, o in out.items() if k.split("__")[0] == "req_0")

    def ours(ps):
        r = rollout.sample(model, ps, G, rollout.SamplingConfig(max_new_tokens=T), eos_token_ids=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, seed=0)
        return sorted(tuple(x[m].tolist()) for x, m in zip(r.response_ids[:G], r.response_mask[:G]))

    print(f"\n== transformers' continuous batching vs rollout.sample: tiny 64x2, {len(prompts)} prompts x G={G}, "
          f"{T} new tokens, CPU, median of {args.repeats}")
    for name, fn in (("generate_batch", lib), ("rollout.sample", ours)):
        same = fn(prompts[:1]) == fn(prompts)
        t = statistics.median(wall(lambda: fn(prompts))[0] for _ in range(args.repeats))
        print(f"  {name:<15} prompt 0's samples alone == in the batch of {len(prompts)}: {same}; "
              f"{1e3 * t:7.1f} ms a batch")


H100_GIB, ROWS = 79.19, 224  # what an 80 GB H100 reports to PyTorch; 256 prompts x G = 7 over 8 GPUs


def h100_budget() -> dict:
    """Qwen3-1.7B training under DDP on an 80 GB H100 with the paper's 224 rows a GPU, as rollout.default_kv_budget
    would find it (arithmetic): parameters, bytes per cached position, training state and decode step bytes, and the
    cache it gets, in bytes and in positions."""
    H, I, n_layers, V, kv, D, heads = 2048, 6144, 28, 151_936, 8, 128, 16
    params = V * H + n_layers * (H * heads * D + 2 * H * kv * D + heads * D * H + 3 * H * I + 2 * H + 2 * D) + H
    bpp = n_layers * 2 * kv * D * 2
    state = 18 * params  # fp32 weights 4 + AdamW 8 + DDP gradient buckets 4 + bf16 autocast weight copies 2 bytes each
    step = rollout.DECODE_BYTES_PER_LOGIT * ROWS * V  # the decode step's [rows, V] logits and sampler tensors
    gathered = ROWS * (1024 + 2048) * bpp // n_layers  # one layer's gathered pages, every row at its longest
    free = int(H100_GIB * 2**30) - state - 2**30  # 1 GiB: CUDA's own context
    positions = rollout.kv_budget_for(free, ROWS, V, bpp, 1024 + 2048, n_layers)
    return dict(params=params, bpp=bpp, state=state, step=step, gathered=gathered, cache=positions * bpp,
                positions=positions)


def full_model_arithmetic(args: Args) -> None:
    """Qwen3-1.7B at the paper's batch: the cache every row at once would need, and what an H100 holds."""
    h = h100_budget()
    params, bpp, state, step = h["params"], h["bpp"], h["state"], h["step"]
    cache, positions, rows = h["cache"], h["positions"], ROWS
    print(f"\n== Qwen3-1.7B arithmetic (printed, not measured): {params / 1e9:.2f}B parameters; {bpp:,} bytes "
          f"(112 KiB) per cached position in bf16 (28 layers x K,V x 8 KV heads x 128 x 2 bytes)")
    print(f"  H100 80 GB: {H100_GIB:.1f} GiB; training state while sampling {state / 2**30:.1f} GiB (fp32 weights, "
          f"AdamW states, DDP gradient buckets, bf16 autocast weight copies), step tensors {step / 2**30:.1f} GiB, "
          f"one layer's gathered pages {h['gathered'] / 2**30:.1f} GiB, 1 GiB context -> 90% of the rest = "
          f"{cache / 2**30:.1f} GiB of cache = {positions:,} positions")
    for new in (2048, 8192):
        L, shared = 1024 + new, rows // 7 * 1024 + rows * new  # a group's prompt held once for its 7 rows
        print(f"  {new:,} new tokens: L = {L:,}; {rows} rows at their longest need {rows * L * bpp / 2**30:.1f} GiB, "
              f"{shared * bpp / 2**30:.1f} GiB with prompts shared; the budget holds {cache / (shared * bpp):.0%} "
              "of that at once (rows end early and leave their pages to others)")


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    sections = dict(tree=tree_vs_flat, paper=paper_case, traffic=traffic, attention=attention, overhead=host_overhead,
                    arithmetic=full_model_arithmetic, engine=engine_counts, library=library, recompiles=recompiles)
    for name in args.sections:
        t0 = time.perf_counter()
        sections[name](args)
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(parse_args())
