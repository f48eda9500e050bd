"""benchmarks/study.py: the aggregation by hand on made-up metrics, bad input, and the driver end to end at
toy size (--quick: one seed, two arms; about 30 s on 2 cores, mostly three processes importing torch)."""
import importlib.util
import json
import math
import os
import statistics
import sys

import pytest

import rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("study", os.path.join(ROOT, "benchmarks", "study.py"))
study = importlib.util.module_from_spec(_spec)
sys.modules["study"] = study  # dataclasses look their module up there
_spec.loader.exec_module(study)


def _write_run(d, val, steps):
    """A metrics.jsonl as train.py writes it: a step-0 validation row, then one row per step."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "wall_s": 0.0, "val_acc": val[0]}) + "\n")
        for r in steps:
            f.write(json.dumps(r) + "\n")


def _step(step, decoded, t, frac, depth, td, reward=0.5, length=20.0, val=None):
    row = dict(step=step, decoded_tokens=decoded, t_step=t, branch_token_frac=frac, first_divergence_depth=depth,
               unique_depth=depth + 1, td_share=td, reward_mean=reward, response_len=length, wall_s=step * 2.0)
    if val is not None:
        row["val_acc"] = val
    return row


def test_aggregate_by_hand(tmp_path):
    """Two steps, validation every step, two seeds, two arms: every table number checked against
    arithmetic on the rows written."""
    args = study.Args(out=str(tmp_path), seeds="0,1", methods="grpo,tempo", steps=2)
    runs = {  # (arm, seed): (acc at steps 0, 1, 2), per-step (decoded, t_step, frac, depth, td)
        ("grpo", 0): ((0.3, 0.35, 0.4), ((100, 1.0, 0.1, 4.0, 0.05), (120, 2.0, 0.2, 6.0, 0.07))),
        ("grpo", 1): ((0.2, 0.2, 0.3), ((90, 1.5, 0.3, 2.0, 0.01), (80, 0.5, 0.1, 4.0, 0.03))),
        ("tempo", 0): ((0.3, 0.5, 0.6), ((100, 1.0, 0.2, 3.0, 0.10), (100, 1.0, 0.2, 5.0, 0.20))),
        ("tempo", 1): ((0.2, 0.1, 0.25), ((50, 1.0, 0.4, 1.0, 0.30), (70, 3.0, 0.0, 3.0, 0.10))),
    }
    for (arm, seed), (acc, rows) in runs.items():
        _write_run(study.run_dir(args, arm, seed), acc,
                   [_step(i + 1, *r, reward=0.1 * (i + 1), val=acc[i + 1]) for i, r in enumerate(rows)])
    res = study.aggregate(args)
    for arm in ("grpo", "tempo"):
        per = res[arm]["per_seed"]
        for seed in (0, 1):
            acc, rows = runs[(arm, seed)]
            s = per[seed]
            assert s["acc_start"] == acc[0] and s["acc_final"] == acc[2]
            assert s["decoded_tokens"] == rows[0][0] + rows[1][0]
            assert s["train_s"] == pytest.approx(rows[0][1] + rows[1][1])
            assert s["branch_token_frac"] == pytest.approx((rows[0][2] + rows[1][2]) / 2)
            assert s["first_divergence_depth"] == pytest.approx((rows[0][3] + rows[1][3]) / 2)
            assert s["td_share"] == pytest.approx((rows[0][4] + rows[1][4]) / 2)
            assert s["branch_tokens_per_response"] == pytest.approx(20.0 * (rows[0][2] + rows[1][2]) / 2)
            assert [c["decoded_tokens"] for c in s["curve"]] == [0, rows[0][0], rows[0][0] + rows[1][0]]
            assert s["acc_mean_after_start"] == pytest.approx((acc[1] + acc[2]) / 2)
        finals = [runs[(arm, s)][0][2] for s in (0, 1)]
        m, sd = res[arm]["mean_sd"]["acc_final"]
        assert m == pytest.approx(sum(finals) / 2) and sd == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
        assert res[arm]["mean_sd"]["acc_final_range"] == (min(finals), max(finals))
    # paired by seed (same warm start): tempo - grpo = (0.6 - 0.4, 0.25 - 0.3)
    m, sd = res["tempo"]["mean_sd"]["vs_grpo"]
    assert m == pytest.approx(statistics.fmean([0.2, -0.05])) and sd == pytest.approx(statistics.stdev([0.2, -0.05]))
    assert "vs_grpo" not in res["grpo"]["mean_sd"]
    tab = study.table(res)
    assert tab.count("\n") == 3  # head, rule, two arms
    assert "0.425 ± 0.247" in tab  # tempo's final accuracy: mean 0.425, sd |0.6 - 0.25| / sqrt 2
    # an incomplete run (the last step's validation missing) is left out, not averaged in
    with open(os.path.join(study.run_dir(args, "tempo", 1), "metrics.jsonl")) as f:
        lines = f.readlines()
    with open(os.path.join(study.run_dir(args, "tempo", 1), "metrics.jsonl"), "w") as f:
        f.writelines(lines[:-1])
    assert study.aggregate(args)["tempo"]["seeds"] == [0]


@pytest.mark.parametrize("flags, word", [
    (["--methods", "grpo,nope"], "--methods"), (["--methods", "grpo,grpo"], "--methods"),
    (["--seeds", "0,0"], "--seeds"), (["--seeds", "a"], "--seeds"), (["--jobs", "0"], "--jobs"),
    (["--group-size", "1"], "--group-size"),
])
def test_bad_input_names_the_flag(flags, word, tmp_path):
    with pytest.raises(ValueError, match=word):
        study.main(["--quick", "--out", str(tmp_path), *flags])
    assert not os.listdir(tmp_path)  # nothing ran


def test_every_arm_differs_only_in_method_and_sampler():
    """The same budget for every arm: the train.py commands differ in --method/--sampler/--out only."""
    args = study.parse_args([])
    cmds = {arm: study.run_command(args, arm, 0) for arm in study.ARMS}
    def budget(cmd):
        flags, rest = {}, cmd[2:]  # after python train.py: --flag value, or a bare --switch
        for i, tok in enumerate(rest):
            if tok.startswith("--"):
                nxt = rest[i + 1] if i + 1 < len(rest) else "--"
                flags[tok] = True if nxt.startswith("--") else nxt
        own = ("--method", "--sampler", "--out", "--tree-tau", "--td-weight")  # an arm's own flags
        return {k: v for k, v in flags.items() if k not in own}
    ref = budget(cmds["grpo"])
    assert all(budget(c) == ref for c in cmds.values())
    for arm, (method, sampler) in study.ARMS.items():
        c = cmds[arm]
        assert c[c.index("--method") + 1] == method and c[c.index("--sampler") + 1] == sampler
    assert cmds["tempo-td4"][cmds["tempo-td4"].index("--td-weight") + 1] == "4"
    assert sum("--td-weight" in c for c in cmds.values()) == 1
    # --warm-root: runs start from another study's warm starts
    other = study.parse_args(["--warm-root", "/elsewhere"])
    assert study.run_command(other, "grpo", 2)[study.run_command(other, "grpo", 2).index("--model") + 1] == "/elsewhere/warm-s2/warm-start"
    # --tree-tau reaches the tree arms only, spelled out even at rollout's default (so the run's record names it)
    for arm, (method, sampler) in study.ARMS.items():
        c = cmds[arm]
        assert (c[c.index("--tree-tau") + 1] == str(rollout.SamplingConfig.tau)) if sampler == "tree" else "--tree-tau" not in c
    tau = study.parse_args(["--tree-tau", "0.1"])
    for arm, (method, sampler) in study.ARMS.items():
        c = study.run_command(tau, arm, 0)
        assert (c[c.index("--tree-tau") + 1] == "0.1") if sampler == "tree" else "--tree-tau" not in c


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, capsys):
    """The driver at toy size: warm start, two arms, table and plots; the table's numbers are the runs'
    metrics; a second call skips every job and writes the same table."""
    out = str(tmp_path / "study")
    argv = ["--quick", "--out", out, "--seeds", "0", "--methods", "grpo,tempo-tree"]
    res = study.main(argv)
    assert res["failed"] == []
    for name in ("results.md", "results.json", "accuracy.png", "diagnostics.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    for png in ("accuracy.png", "diagnostics.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(out, "results.json")))
    md = open(os.path.join(out, "results.md")).read()
    for arm in ("grpo", "tempo-tree"):
        rows = [json.loads(line) for line in open(os.path.join(out, f"{arm}-s0", "metrics.jsonl"))]
        steps = [r for r in rows if "t_step" in r]
        assert len(steps) == 2 and rows[-1]["step"] == 2  # --quick: 2 RL steps
        s = saved["arms"][arm]["per_seed"]["0"]
        assert s["acc_final"] == rows[-1]["val_acc"] and s["acc_start"] == rows[0]["val_acc"]
        assert s["decoded_tokens"] == sum(r["decoded_tokens"] for r in steps)
        frac = statistics.fmean(r["branch_token_frac"] for r in steps)
        assert s["branch_token_frac"] == pytest.approx(frac)
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {arm} |"))
        assert f"{rows[-1]['val_acc']:.3f} ± 0.000" in line and f"{frac:.3f} ± 0.000" in line
        cmd = json.load(open(os.path.join(out, f"{arm}-s0", "config.json")))
        assert (cmd["method"], cmd["sampler"]) == study.ARMS[arm]
        assert cmd["model"] == os.path.abspath(os.path.join(out, "warm-s0", "warm-start"))  # the shared warm start
    capsys.readouterr()
    study.main(argv)  # resumable: everything is complete, nothing runs again
    printed = capsys.readouterr().out
    assert printed.count("[study] skip") == 3 and "[study] start" not in printed
    assert open(os.path.join(out, "results.md")).read().split("| arm |")[1] == md.split("| arm |")[1]
