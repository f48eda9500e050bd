"""study.py: does tree credit assignment help? GRPO, TEMPO, TreeAdv, HEPO and the field's tree estimators side by side.

What (SPEC 8): on the offline "chain" task (multi-step sums with every running sum written
out, "12+34+56+7=" -> "12+34=46;46+56=102;102+7=109", about 25 tokens a response, so a group's trie has
branch points deep inside the response), each seed gets ONE supervised warm start of a tiny Qwen3
(train.warm_start, cached in OUT/warm-sS), shared by every arm of that seed, so differences come from the
RL phase alone. Then every arm runs train.py from it at the same rollout budget (prompts x G per
step, steps, max_new_tokens, lr: only --method and --sampler differ):

    grpo        --method grpo    --sampler flat   SPEC 1, the baseline
    tempo       --method tempo   --sampler flat   SPEC 3 on independent samples (the TEMPO paper)
    tempo-tree  --method tempo   --sampler tree   SPEC 3 on the entropy-forked forest (shares deep prefixes)
    treeadv     --method treeadv --sampler tree   SPEC 5a (flattened leaf paths)
    hepo        --method hepo    --sampler flat   SPEC 4
    grpo-tree   --method grpo    --sampler tree   tree sampling without any tree credit: with tempo-tree
                                                   and treeadv it separates the sampler from the credit
    tempo-td4   --method tempo   --sampler flat --td-weight 4   (not in the default list) TEMPO's TD term x4:
                                                   if the TD credit moves accuracy, more of it should move it more
    ppo         --method ppo     --sampler flat   (not in the default list) SPEC 9, PPO with a
                                                   learned critic (TEMPO's first baseline); critic lr 10x the policy's
    treeadv-centred, treerl, treepo, spo   --method the same --sampler tree   (not in the default list) the
                                                   seed's centred TreeAdv and the field's other tree estimators
                                                   (README's table), on the same forest as tempo-tree and treeadv

How to run (from the repository root; 2 runs at a time by default, one torch thread each):
    python benchmarks/study.py                           # the default study (3 seeds x 6 arms): 3 warm starts
        # of 1.5-3 min, then 18 runs of about 100 s, 2 at a time: 21 min on an idle 2-core CPU (Nov 2026)
    python benchmarks/study.py --quick --out /tmp/study  # toy size, under a minute (the smoke test)
    python benchmarks/study.py --seeds 0,1,2,3 --methods grpo,tempo,grpo-tree,tempo-tree
    python benchmarks/study.py --report-only             # aggregate what OUT holds, run nothing
    python benchmarks/study.py --methods grpo,ppo --out runs/study-ppo   # PPO with a critic against GRPO
    python benchmarks/study.py --methods grpo,grpo-tree,treeadv,treeadv-centred,treerl,treepo,spo --out runs/study-tree
It is resumable: a run (or warm start) whose directory holds the same command and complete output is
skipped, so an interrupted study continues where it stopped; a changed setting reruns what it touches.

What it prints: each command as it starts (its output goes to OUT/logs/NAME.txt), then the results
table, written with everything else to
    OUT/results.md    the table and the setup (machine, threads, total time)
    OUT/results.json  the same numbers, per seed and aggregated, and the curves
    OUT/accuracy.png  greedy accuracy vs RL step, vs decoded tokens, vs training seconds (mean over seeds, +-1 sd)
    OUT/diagnostics.png  reward, branch-token fraction, first-divergence depth, td_share per step
Every number comes from the runs' metrics.jsonl (train.py's log): final greedy accuracy on the test
split (val_acc at the last step), decoded tokens (rollout.Rollout.decoded_tokens summed over steps:
model positions actually run, so tree sampling's shared prefixes count once), training seconds (sum of
t_step: rollout + reward + advantages + update, validation excluded) and the SPEC 8 diagnostics of
advantages.branch_diagnostics, averaged over every step of every seed. The diagnostics are computed
for every method, from its own sampled groups.

Departures: wall-clock seconds are measured with `--jobs` runs sharing the CPU, so they compare arms
run the same way, not absolute speeds. Accuracy is greedy on `--val-limit` test questions (sd of a
proportion near 0.3 on 500 questions: about 0.02).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import evaluate  # noqa: E402  (the Args -> argparse helper; imports no torch)

# The arms: name -> (train.py --method, --sampler).
ARMS = {
    "grpo": ("grpo", "flat"),
    "tempo": ("tempo", "flat"),
    "tempo-tree": ("tempo", "tree"),
    "treeadv": ("treeadv", "tree"),
    "hepo": ("hepo", "flat"),
    "grpo-tree": ("grpo", "tree"),
    "tempo-td4": ("tempo", "flat"),
    "ppo": ("ppo", "flat"),
    "treeadv-centred": ("treeadv-centred", "tree"),
    "treerl": ("treerl", "tree"),
    "treepo": ("treepo", "tree"),
    "spo": ("spo", "tree"),
}
# Arms that differ from another in one more train.py flag: a dose-response check of TEMPO's TD term.
ARM_FLAGS = {"tempo-td4": ["--td-weight", "4"]}
DIAGNOSTICS = ("branch_token_frac", "first_divergence_depth", "unique_depth", "td_share")


@dataclass
class Args:
    out: str = "runs/study"
    """study directory: warm-sS/ (warm starts), ARM-sS/ (runs), results.md/json, accuracy.png, diagnostics.png"""
    warm_root: str | None = None
    """take the warm starts from this study directory instead of OUT (same recipe: an ablation in its own OUT
    reuses a finished study's warm starts; a missing one is made there)"""
    seeds: str = "0,1,2"
    """comma-separated seeds; each gets its own warm start, data order and sampling"""
    methods: str = "grpo,tempo,grpo-tree,tempo-tree,treeadv,hepo"
    """comma-separated arms (grpo, tempo, grpo-tree, tempo-tree, treeadv, hepo, tempo-td4, ppo, treeadv-centred,
    treerl, treepo, spo)"""
    quick: bool = False
    """toy size for the smoke test (QUICK below); flags given still win"""
    jobs: int = 2
    """runs at a time (each gets usable cores // jobs torch threads)"""
    report_only: bool = False
    """aggregate the runs OUT holds and write the table and plots; run nothing"""
    # --- the model and its warm start (train.warm_start)
    tiny_hidden: int = 128
    """tiny Qwen3 hidden size"""
    tiny_layers: int = 4
    """tiny Qwen3 decoder layers"""
    warm_steps: int = 600
    """most supervised warm-start steps"""
    warm_target: float = 0.3
    """warm start stops once greedy accuracy on 200 training prompts reaches this (checked every 50 steps)"""
    warm_lr: float = 1e-3
    """warm-start learning rate"""
    warm_batch: int = 64
    """warm-start batch size"""
    # --- the RL budget, the same for every arm
    steps: int = 80
    """RL steps"""
    prompts_per_step: int = 32
    """P prompts a step (one optimizer update a step)"""
    group_size: int = 8
    """G responses (leaves) per prompt"""
    max_new_tokens: int = 40
    """response budget (chain's longest solution is 31 characters + EOS)"""
    lr: float = 1e-4
    """RL learning rate (AdamW)"""
    warmup_steps: int = 5
    """linear lr warmup steps"""
    val_every: int = 20
    """greedy validation every N steps (and before the first, after the last)"""
    val_limit: int = 500
    """test questions for greedy validation"""
    tree_tau: float | None = None
    """tree arms: the sampler's entropy threshold in nats (None: rollout's default, 0.5); flat arms ignore it"""
    extra: str = ""
    """more train.py flags for every run, e.g. "--scale none" (quoted)"""


# --quick: the smoke test's size (two tiny runs per arm finish in seconds).
QUICK = dict(tiny_hidden=32, tiny_layers=1, warm_steps=50, warm_target=1.0, steps=2,
             prompts_per_step=4, group_size=4, val_every=1, val_limit=16, seeds="0,1")


def parse_args(argv: list[str] | None = None) -> Args:
    """Args from the command line: the field defaults, then QUICK with --quick, then the flags given."""
    parser = evaluate.dataclass_parser(Args, __doc__.splitlines()[0])
    given = vars(parser.parse_args(argv))
    args = Args(**{**(QUICK if given.get("quick") else {}), **given})
    check_args(args)
    return args


def seed_list(args: Args) -> list[int]:
    return [int(s) for s in args.seeds.split(",") if s.strip()]


def arm_list(args: Args) -> list[str]:
    return [m.strip() for m in args.methods.split(",") if m.strip()]


def check_args(args: Args) -> None:
    """ValueError naming the argument, before anything runs."""
    try:
        seeds = seed_list(args)
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {args.seeds!r}: need at least one seed, no repeats")
    arms = arm_list(args)
    bad = [m for m in arms if m not in ARMS]
    if not arms or bad or len(set(arms)) != len(arms):
        raise ValueError(f"--methods {args.methods!r}: choose distinct arms from {', '.join(ARMS)}")
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be >= 1")
    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "val_every", "val_limit", "warm_steps"):
        if getattr(args, name) < (2 if name == "group_size" else 1):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: too small")


# ==============================================================================================
# 1. The commands: one warm start per seed, one train.py run per (arm, seed)


def warm_dir(args: Args, seed: int) -> str:
    return os.path.join(args.warm_root or args.out, f"warm-s{seed}", "warm-start")


def run_dir(args: Args, arm: str, seed: int) -> str:
    return os.path.join(args.out, f"{arm}-s{seed}")


def warm_flags(args: Args, seed: int) -> list[str]:
    """train.py flags of one seed's warm start, made in warm_dir (benchmarks/bench_rollout.py warms its model so too)."""
    return ["--task", "chain", "--model", "tiny", "--tiny-hidden", str(args.tiny_hidden), "--tiny-layers",
            str(args.tiny_layers), "--seed", str(seed), "--out", os.path.dirname(os.path.abspath(warm_dir(args, seed))),
            "--device", "cpu"]


def warm_recipe(args: Args) -> dict:
    return dict(steps=args.warm_steps, target=args.warm_target, batch=args.warm_batch, lr=args.warm_lr)


def warm_command(args: Args, seed: int) -> list[str]:
    """train.warm_start with the study's recipe (it caches by recipe and writes atomically)."""
    return [sys.executable, "-c", "import json, sys, train; train.warm_start(train.parse_args(sys.argv[2:]), "
            "json.loads(sys.argv[1]))", json.dumps(warm_recipe(args)), *warm_flags(args, seed)]


def run_command(args: Args, arm: str, seed: int) -> list[str]:
    """train.py for one arm and seed; the budget flags are the same for every arm."""
    method, sampler = ARMS[arm]
    P = args.prompts_per_step
    return [sys.executable, "train.py", "--method", method, "--sampler", sampler, "--task", "chain",
            "--model", os.path.abspath(warm_dir(args, seed)), "--seed", str(seed),
            "--out", os.path.abspath(run_dir(args, arm, seed)),
            "--group-size", str(args.group_size), "--prompts-per-step", str(P), "--mini-batch-prompts", str(P),
            "--micro-batch-rows", str(P * args.group_size), "--max-new-tokens", str(args.max_new_tokens),
            "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps),
            "--val-limit", str(args.val_limit), "--val-every", str(args.val_every),
            "--save-every", "0", "--sample-every", str(args.val_every), "--device", "cpu", "--no-progress",
            # tau always spelled out, so a run made under another rollout default is not taken as done
            *(["--tree-tau", str(rollout_tau() if args.tree_tau is None else args.tree_tau)] if sampler == "tree" else []),
            *ARM_FLAGS.get(arm, []), *shlex.split(args.extra)]


def warm_complete(d: str) -> bool:
    return os.path.exists(os.path.join(d, "warm_start.json")) and os.path.exists(os.path.join(d, "config.json"))


def run_complete(d: str, steps: int) -> bool:
    """metrics.jsonl ends with the last step's validation."""
    try:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(rows) and rows[-1].get("step") == steps and "val_acc" in rows[-1]


# ==============================================================================================
# 2. Running them: `jobs` at a time, a run after its seed's warm start, skipping what is done


@dataclass
class Job:
    name: str
    cmd: list[str]
    dir: str
    complete: typing.Callable[[], bool]
    after: str | None = None  # the job that must finish first
    key: object = None  # what identifies the job's settings (default: its command), recorded when it ends


def job_done(job: Job) -> bool:
    """Done = complete output AND the same settings recorded (a changed setting reruns)."""
    try:
        with open(os.path.join(job.dir, "study_cmd.json")) as f:
            same = json.load(f) == json.loads(json.dumps(job.key or job.cmd))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return same and job.complete()


def log_path(job: Job) -> str:
    """OUT/logs/NAME.txt: beside the job's directory, not in it (train.warm_start replaces its directory whole)."""
    d = os.path.join(os.path.dirname(os.path.abspath(job.dir)), "logs")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"{job.name}.txt")


def run_jobs(jobs: list[Job], parallel: int, threads: int, on_job_end=lambda: None) -> list[str]:
    """Run the jobs not already done, `parallel` at a time; returns the names of those that failed.
    `on_job_end()` is called after each job ends (main records the elapsed time there)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    state = {j.name: "done" if job_done(j) else "todo" for j in jobs}
    for j in jobs:
        if state[j.name] == "done":
            print(f"[study] skip {j.name}: complete in {j.dir}", flush=True)
    running: dict[str, tuple[subprocess.Popen, float, typing.IO]] = {}
    while any(s in ("todo", "running") for s in state.values()):
        for j in jobs:
            if len(running) >= parallel:
                break
            if state[j.name] != "todo":
                continue
            if j.after and state[j.after] == "failed":
                state[j.name] = "failed"
                print(f"[study] {j.name}: not run, {j.after} failed", flush=True)
                continue
            if j.after and state[j.after] != "done":
                continue
            shutil.rmtree(j.dir, ignore_errors=True)  # an unfinished or changed run: train.py starts it afresh
            os.makedirs(j.dir, exist_ok=True)
            log = open(log_path(j), "w")
            print(f"[study] start {j.name}: {shlex.join(j.cmd)}", flush=True)
            running[j.name] = (subprocess.Popen(j.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                               time.time(), log)
            state[j.name] = "running"
        time.sleep(0.2)
        for name, (p, t0, log) in list(running.items()):
            if p.poll() is None:
                continue
            log.close()
            del running[name]
            j = next(j for j in jobs if j.name == name)
            if p.returncode == 0 and j.complete():
                with open(os.path.join(j.dir, "study_cmd.json"), "w") as f:
                    json.dump(j.key or j.cmd, f)
                state[name] = "done"
                print(f"[study] done  {name} in {time.time() - t0:.0f} s", flush=True)
            else:
                state[name] = "failed"
                with open(log_path(j)) as f:
                    tail = f.read()[-2000:]
                print(f"[study] FAILED {name} (exit {p.returncode}); end of {log_path(j)}:\n{tail}", flush=True)
            on_job_end()
    return [n for n, s in state.items() if s == "failed"]


def plan(args: Args) -> list[Job]:
    """Warm starts first (one per seed), then the runs seed by seed, arms interleaved, so that a study
    cut short still has every arm on its first seeds."""
    jobs = []
    for s in seed_list(args):
        d = warm_dir(args, s)
        jobs.append(Job(f"warm-s{s}", warm_command(args, s), os.path.dirname(d), lambda d=d: warm_complete(d)))
    for s in seed_list(args):
        for arm in arm_list(args):
            d, cmd = run_dir(args, arm, s), run_command(args, arm, s)
            # the key holds the warm start's command too: a new warm start reruns the runs made from it
            jobs.append(Job(f"{arm}-s{s}", cmd, d, lambda d=d: run_complete(d, args.steps), after=f"warm-s{s}",
                            key=dict(run=cmd, warm=warm_command(args, s))))
    return jobs


# ==============================================================================================
# 3. Aggregation: every number from the runs' metrics.jsonl


def read_metrics(d: str) -> list[dict]:
    """train.py's metrics.jsonl reader (it skips a torn last line); imported here because it imports torch."""
    import train
    return train.read_metrics(d)


def run_summary(rows: list[dict]) -> dict:
    """One run's numbers: the validation curve against step, cumulative decoded tokens and training
    seconds; final and initial accuracy; means over steps of reward and the SPEC 8 diagnostics."""
    steps = [r for r in rows if "t_step" in r]
    decoded, seconds, cum = 0, 0.0, {0: (0, 0.0)}
    for r in steps:
        decoded += r["decoded_tokens"]
        seconds += r["t_step"]
        cum[r["step"]] = (decoded, seconds)
    val = [(r["step"], r["val_acc"]) for r in rows if r.get("val_acc") is not None]
    mean = lambda k: statistics.fmean(r[k] for r in steps if r.get(k) is not None and math.isfinite(r[k]))  # noqa: E731
    return dict(
        curve=[dict(step=s, acc=a, decoded_tokens=cum[s][0], train_s=cum[s][1]) for s, a in val],
        acc_start=val[0][1], acc_final=val[-1][1], acc_mean_after_start=statistics.fmean(a for _, a in val[1:]),
        decoded_tokens=decoded, train_s=seconds, wall_s=rows[-1]["wall_s"],
        reward_first10=statistics.fmean(r["reward_mean"] for r in steps[:10]),
        reward_last10=statistics.fmean(r["reward_mean"] for r in steps[-10:]),
        response_len=mean("response_len"),
        **{k: mean(k) for k in DIAGNOSTICS},
        branch_tokens_per_response=statistics.fmean(r["branch_token_frac"] * r["response_len"] for r in steps),
        per_step={k: [r[k] for r in steps] for k in ("step", "reward_mean", *DIAGNOSTICS)},
    )


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(args: Args) -> dict:
    """results.json's content: per arm, per seed summaries, and means / sds over seeds."""
    arms, seeds = arm_list(args), seed_list(args)
    runs = {arm: {s: run_summary(read_metrics(run_dir(args, arm, s))) for s in seeds
                  if run_complete(run_dir(args, arm, s), args.steps)} for arm in arms}
    out = {}
    for arm in arms:
        per = runs[arm]
        if not per:
            continue
        got = sorted(per)
        agg = {k: mean_sd([per[s][k] for s in got]) for k in
               ("acc_start", "acc_final", "acc_mean_after_start", "decoded_tokens", "train_s", "reward_first10",
                "reward_last10", "response_len", "branch_tokens_per_response", *DIAGNOSTICS)}
        agg["acc_gain"] = mean_sd([per[s]["acc_final"] - per[s]["acc_start"] for s in got])
        agg["acc_final_range"] = (min(per[s]["acc_final"] for s in got), max(per[s]["acc_final"] for s in got))
        base = runs.get("grpo", {})
        paired = [s for s in got if s in base]  # same seed = same warm start, data order and test questions
        if arm != "grpo" and paired:
            agg["vs_grpo"] = mean_sd([per[s]["acc_final"] - base[s]["acc_final"] for s in paired])
        method, sampler = ARMS[arm]
        out[arm] = dict(method=method, sampler=sampler, seeds=got, mean_sd=agg, per_seed=per)
    return out


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def table(results: dict) -> str:
    """The markdown table: accuracy (mean ± sd over seeds [min, max]), cost, and the SPEC 8 diagnostics."""
    head = ("| arm | method | sampler | seeds | greedy acc start | greedy acc final [min, max] | gain | vs grpo (paired) "
            "| mean acc after start | decoded tokens / run | train s / run | branch-token frac | branch tokens / response "
            "| first-divergence depth | unique depth | td_share | response len |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, r in results.items():
        a = r["mean_sd"]
        lo, hi = a["acc_final_range"]
        vs = fmt(a["vs_grpo"]) if "vs_grpo" in a else "-"
        lines.append(
            f"| {arm} | {r['method']} | {r['sampler']} | {len(r['seeds'])} | {fmt(a['acc_start'])} | "
            f"{fmt(a['acc_final'])} [{lo:.3f}, {hi:.3f}] | {a['acc_gain'][0]:+.3f} ± {a['acc_gain'][1]:.3f} | {vs} | "
            f"{fmt(a['acc_mean_after_start'])} | {a['decoded_tokens'][0]:,.0f} | {a['train_s'][0]:.0f} | "
            f"{fmt(a['branch_token_frac'])} | {fmt(a['branch_tokens_per_response'], 2)} | "
            f"{fmt(a['first_divergence_depth'], 2)} | {fmt(a['unique_depth'], 2)} | {fmt(a['td_share'])} | "
            f"{a['response_len'][0]:.1f} |")
    return "\n".join(lines)


# ==============================================================================================
# 4. Plots: mean over seeds at each validation step, +-1 sd


def plot(results: dict, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(r, key):  # means over seeds at each validation step (all seeds validate at the same steps)
        per = [r["per_seed"][s]["curve"] for s in r["seeds"]]
        n = min(len(c) for c in per)
        x = [statistics.fmean(c[i][key] for c in per) for i in range(n)]
        y = [mean_sd([c[i]["acc"] for c in per]) for i in range(n)]
        return x, [m for m, _ in y], [sd for _, sd in y]

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for arm, r in results.items():
        for a, (key, scale) in zip(ax, (("step", 1), ("decoded_tokens", 1e6), ("train_s", 1))):
            x, m, sd = curve(r, key)
            x = [v / scale for v in x]
            line, = a.plot(x, m, "o-", ms=3, label=f"{arm} ({len(r['seeds'])} seeds)")
            a.fill_between(x, [u - v for u, v in zip(m, sd)], [u + v for u, v in zip(m, sd)],
                           color=line.get_color(), alpha=0.12)
    for a, label in zip(ax, ("RL step", "decoded tokens (millions, cumulative)", "training seconds (cumulative)")):
        a.set(xlabel=label, title=f"greedy test accuracy vs {label.split(' (')[0]}")
        a.grid(alpha=0.3)
    ax[0].set_ylabel("accuracy (mean over seeds, ±1 sd)")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    acc_png = os.path.join(out_dir, "accuracy.png")
    fig.savefig(acc_png, dpi=110)
    plt.close(fig)

    keys = ("reward_mean", "branch_token_frac", "first_divergence_depth", "td_share")
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    for arm, r in results.items():
        per = [r["per_seed"][s]["per_step"] for s in r["seeds"]]
        n = min(len(p["step"]) for p in per)
        for a, key in zip(ax, keys):
            y = [statistics.fmean(v for p in per if math.isfinite(v := p[key][i])) for i in range(n)]
            ema, smooth = None, []  # per-step values are noisy: an exponential moving average (0.9)
            for v in y:
                ema = v if ema is None else 0.9 * ema + 0.1 * v
                smooth.append(ema)
            a.plot(per[0]["step"][:n], smooth, label=arm)
    for a, key in zip(ax, keys):
        a.set(xlabel="RL step", title=f"{key} (mean over seeds, EMA 0.9)")
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    diag_png = os.path.join(out_dir, "diagnostics.png")
    fig.savefig(diag_png, dpi=110)
    plt.close(fig)
    return [acc_png, diag_png]


# ==============================================================================================
# 5. Main: run the grid, aggregate, write and print


def usable_cores() -> int:
    """The cores this process may run on (`taskset -c 0 python benchmarks/study.py` keeps the others free)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rollout_tau() -> float:
    import rollout  # imports torch: the driver needs it only for this default
    return rollout.SamplingConfig.tau


def setup_text(args: Args, threads: int, total_s: float | None) -> str:
    cores = usable_cores()
    return (f"Task chain; tiny Qwen3 {args.tiny_hidden} x {args.tiny_layers}; warm start: train.warm_start to "
            f"{args.warm_target} greedy accuracy on 200 training prompts (at most {args.warm_steps} steps, batch "
            f"{args.warm_batch}, lr {args.warm_lr}), one per seed, shared by every arm. RL: {args.steps} steps x "
            f"{args.prompts_per_step} prompts x G = {args.group_size}, max {args.max_new_tokens} new tokens, lr {args.lr} "
            f"({args.warmup_steps} warmup steps), temperature 1, one update a step; greedy accuracy on {args.val_limit} "
            f"test questions every {args.val_every} steps; tree sampler tau "
            f"{f'rollout default ({rollout_tau()} nat)' if args.tree_tau is None else f'{args.tree_tau} nat'}. Seeds {args.seeds}. "
            f"Extra train.py flags: {args.extra or 'none'}.\n"
            f"Machine: {platform.machine()}, {cores} of {os.cpu_count()} CPU cores, no GPU; {args.jobs} run(s) at a time, "
            f"{threads} torch thread(s) each" + (f"; study wall time {total_s / 60:.1f} min." if total_s is not None else "."))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = max(1, usable_cores() // args.jobs)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    timing_path = os.path.join(args.out, "study_time.json")  # one entry per invocation: a resumed study adds up
    prev = json.load(open(timing_path)) if os.path.exists(timing_path) else []

    def record_time():  # after every job, so a study killed midway still knows how long it ran
        piece = dict(started=t0, seconds=time.time() - t0, argv=argv if argv is not None else sys.argv[1:])
        with open(timing_path + ".tmp", "w") as f:
            json.dump(prev + [piece], f, indent=1)
        os.replace(timing_path + ".tmp", timing_path)

    failed = []
    if not args.report_only:
        failed = run_jobs(plan(args), args.jobs, threads, record_time)
        record_time()
    pieces = json.load(open(timing_path)) if os.path.exists(timing_path) else []
    total_all = sum(p["seconds"] for p in pieces) if pieces else None
    results = aggregate(args)
    if not results:
        raise SystemExit(f"no complete runs in {args.out}")
    text = setup_text(args, threads, total_all)
    tab = table(results)
    pngs = plot(results, args.out)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# Study: tree credit assignment on `chain` ({', '.join(results)})\n\n{text}\n\n{tab}\n\n"
                f"Plots: {', '.join(os.path.basename(p) for p in pngs)}. Command: "
                f"`python benchmarks/study.py {shlex.join(argv if argv is not None else sys.argv[1:])}`\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(args=dataclasses.asdict(args), setup=text, total_s=total_all, failed=failed, arms=results),
                  f, indent=1)
    print(f"\n{text}\n\n{tab}\n\nwritten: {os.path.join(args.out, 'results.md')}, results.json, "
          f"{', '.join(os.path.basename(p) for p in pngs)}", flush=True)
    if failed:
        print(f"[study] {len(failed)} job(s) failed: {', '.join(failed)}", flush=True)
    return dict(results=results, failed=failed)


if __name__ == "__main__":
    main()
