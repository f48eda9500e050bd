"""bench_rollout.py: tree sampling against flat sampling at equal leaves, and flat sampling against `generate`.

For each model it samples P chain questions x G leaves with rollout.sample, flat and tree (at
SamplingConfig's defaults, then at each further --taus value), and with `model.generate`
(do_sample, top_k=0, top_p=1, temperature 1, the same max_new_tokens and EOS), then prints:
- decoded token positions per leaf (rows fed to the model, summed over steps) and wall time per leaf,
  tree / flat as ratios (issue 3's target: tree decodes >= 25% fewer positions per leaf); forks and
  fresh chains per prompt; response tokens per leaf (tree leaves run longer than flat samples); decode
  steps (model calls one after another: what a batch-bound GPU waits for);
- prefilled tokens: rollout prefills each prompt once, so re-prefilled prefix tokens = prefilled -
  sum of prompt lengths (target 0); `generate` prefills every row;
- sampled tokens per second, flat vs generate (target: flat no slower).
Wall times are medians over `repeats` rounds (seeds 0..repeats-1) after one warm-up, each round running
every sampler once in turn; token counts are means over the same runs, so they do not depend on the
machine's load; wall times do.

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

Run from the repository root:
    python benchmarks/bench_rollout.py                        # 64x2, 128x4 and warm; tau 0.5 (default), 1.0, 0.3, 0.1
    python benchmarks/bench_rollout.py --models 128x4 --max-new-tokens 256 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

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
    dtype: str = "float32"
    """model dtype: float32 or bfloat16"""
    threads: int = 2
    """torch CPU threads"""
    warm_dir: str = "runs/bench-rollout-warm"
    """where the `warm` model is cached, as WARM_DIR/warm-s0 (train.warm_start reuses it when the recipe matches)"""


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
    return args


def load(name: str, args: Args):
    """(model, tokenizer, label) for one --models entry."""
    dtype = getattr(torch, args.dtype)
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


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    P, G, B = args.P, args.G, args.P * args.G
    default_tau = rollout.SamplingConfig().tau
    taus = [default_tau] + [t for t in args.taus if t != default_tau]
    print(f"device={args.device} dtype={args.dtype} threads={args.threads} P={P} G={G} max_new_tokens={args.max_new_tokens} "
          f"repeats={args.repeats}; tree defaults: {rollout.SamplingConfig(sampler='tree')}")
    for name in args.models:
        model, tok, label = load(name, args)
        prompts = [evaluate.prompt_ids("chain", ex, tok) for ex in evaluate.load_examples("chain", "test", limit=P)]
        prompt_tokens = sum(map(len, prompts))
        eos, pad = tok.eos_token_id, tok.pad_token_id

        def run(sampler, tau=default_tau):
            cfg = rollout.SamplingConfig(max_new_tokens=args.max_new_tokens, sampler=sampler, tau=tau)
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
            forks = statistics.fmean([float(r.tree_forks.float().mean()) for r in tree])
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


if __name__ == "__main__":
    main(parse_args())
