"""Tests of what a killed, corrupted or mismatched run does (train.py), and of its messages.

One short run of the tiny model (2 steps, a sealed checkpoint after each) is made once; each test copies it,
breaks it the way a kill, a full disk or a careless restart does, and resumes. Then: non-finite weights,
the one-line user errors (in process and as `python train.py` / torchrun), and a hung rank under torchrun.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT,
       "TRANSFORMERS_VERBOSITY": "error"}
VOLATILE = ("t_", "wall_s", "tokens_per_s", "decode_tokens_per_s", "update_tokens_per_s", "peak_mem_gb")


def _flags(out, model, *extra):
    return ["--model", model, "--task", "add", "--group-size", "4", "--prompts-per-step", "8", "--mini-batch-prompts",
            "4", "--micro-batch-rows", "8", "--max-new-tokens", "6", "--lr", "3e-4", "--val-every", "0",
            "--sample-every", "1", "--save-every", "1", "--keep-last", "2", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _steps(out, name="metrics.jsonl"):
    return [r["step"] for r in train.read_jsonl(os.path.join(out, name))]


def _ckpts(out):
    return sorted(n for n in os.listdir(out) if n.startswith("ckpt-"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """A finished 2-step run: ckpt-000001 and ckpt-000002 (both sealed), metrics and samples of steps 1-2."""
    out = tmp_path_factory.mktemp("base") / "run"
    train.train(train.parse_args(_flags(out, tiny_model_dir, "--steps", "2")))
    assert _ckpts(out) == ["ckpt-000001", "ckpt-000002"] and _steps(out) == [1, 2]
    return out


@pytest.fixture
def run(base, tmp_path, tiny_model_dir):
    """(a copy of the base run, a function resuming it with extra flags)."""
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out, lambda *extra: train.train(train.parse_args(_flags(out, tiny_model_dir, "--resume", *extra)))


# ----------------------------------------------------------------------------------------------
# 1, 6. --resume never deletes: it finds the newest complete checkpoint itself


def test_resume_without_latest_deletes_nothing(run, capsys):
    out, resume = run
    os.remove(out / "latest")
    resume("--steps", "2")
    assert f"resumed from {out / 'ckpt-000002'} at step 2" in capsys.readouterr().out
    assert _ckpts(out) == ["ckpt-000001", "ckpt-000002"]
    assert _steps(out) == [1, 2] and _steps(out, "samples.jsonl") == [1, 2]


def test_resume_after_the_newest_checkpoint_was_deleted_redoes_its_step_exactly(run, base, capsys):
    """`latest` names a deleted checkpoint: the run resumes from ckpt-000001, trims metrics and samples to
    step 1, and step 2 comes out as it did the first time (the resume is exact)."""
    out, resume = run
    shutil.rmtree(out / "ckpt-000002")
    resume("--steps", "3")
    assert f"resumed from {out / 'ckpt-000001'} at step 1" in capsys.readouterr().out
    assert _steps(out) == [1, 2, 3] and _steps(out, "samples.jsonl") == [1, 2, 3]  # no step logged twice
    assert _stable(train.read_metrics(out))[:2] == _stable(train.read_metrics(base))
    assert _ckpts(out) == ["ckpt-000002", "ckpt-000003"]  # --keep-last 2


def test_resume_of_a_run_without_a_complete_checkpoint_stops_and_keeps_it(run):
    out, resume = run
    for name in ("ckpt-000001", "ckpt-000002"):
        os.remove(out / name / train.COMPLETE)  # both killed mid-write
    before = sorted(os.listdir(out))
    with pytest.raises(train.UserError, match=rf"{out}.*metrics.jsonl.*no complete checkpoint"):
        resume("--steps", "3")
    assert sorted(os.listdir(out)) == before and _steps(out) == [1, 2]


def test_resume_of_an_empty_out_starts_fresh(tmp_path, tiny_model_dir, capsys):
    train.train(train.parse_args(_flags(tmp_path / "new", tiny_model_dir, "--resume", "--steps", "1")))
    assert "holds no run yet; starting fresh" in capsys.readouterr().out and _steps(tmp_path / "new") == [1]


# ----------------------------------------------------------------------------------------------
# 2. A damaged newest checkpoint is skipped, with the reason, for the newest one that loads


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _zero_same_size(path):
    with open(path, "r+b") as f:
        f.write(b"\0" * os.path.getsize(path))


@pytest.mark.parametrize("damage,why", [
    (lambda c: _truncate(c / "model.safetensors"), "model.safetensors has .* bytes"),
    (lambda c: _truncate(c / "state" / "__0_0.distcp"), "state/__0_0.distcp has .* bytes"),
    (lambda c: os.remove(c / "trainer_state.json"), "trainer_state.json is missing"),
    (lambda c: os.remove(c / train.COMPLETE), "no COMPLETE.json"),  # killed before the seal
    (lambda c: _zero_same_size(c / "state" / ".metadata"), "loading failed"),  # passes the seal, fails to load
])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(run, capsys, damage, why):
    out, resume = run
    damage(out / "ckpt-000002")
    resume("--steps", "1")
    said = capsys.readouterr().out
    assert any(line.startswith(f"skipped {out / 'ckpt-000002'}: ") for line in said.splitlines()), said
    assert __import__("re").search(why, said), said
    assert f"resumed from {out / 'ckpt-000001'} at step 1" in said
    assert _ckpts(out) == ["ckpt-000001", "ckpt-000002"] and _steps(out) == [1]  # trimmed; nothing deleted


def test_checkpoint_problem_covers_every_file_at_any_depth(base, tmp_path):
    """The seal lists every file under the checkpoint (a critic's files in a subdirectory included)."""
    ckpt = tmp_path / "c"
    shutil.copytree(base / "ckpt-000002", ckpt)
    os.makedirs(ckpt / "critic")
    (ckpt / "critic" / "w.bin").write_bytes(b"12345")
    train.seal_checkpoint(str(ckpt), 2)
    assert train.checkpoint_problem(str(ckpt)) is None
    (ckpt / "critic" / "w.bin").write_bytes(b"1234")
    assert "critic/w.bin has 4 bytes, 5" in train.checkpoint_problem(str(ckpt))
    os.remove(ckpt / "critic" / "w.bin")
    assert "critic/w.bin is missing" in train.checkpoint_problem(str(ckpt))


def test_keep_last_deletes_only_after_the_new_checkpoint_is_sealed(run, monkeypatch):
    """With --keep-last 1 a failing save must leave the previous checkpoint: the older one goes only once
    the new one is sealed."""
    out, resume = run

    def seal_fails(path, step):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train, "seal_checkpoint", seal_fails)
    with pytest.raises(OSError):
        resume("--steps", "3", "--keep-last", "1")
    assert train.latest_checkpoint(str(out)) == str(out / "ckpt-000002") and "ckpt-000001" in _ckpts(out)


# ----------------------------------------------------------------------------------------------
# 3. Torn lines


def test_torn_metrics_and_samples_lines_then_resume(run):
    out, resume = run
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"step": 3, "reward_me')  # the disk filled mid-append
    resume("--steps", "3")
    assert _steps(out) == [1, 2, 3] and _steps(out, "samples.jsonl") == [1, 2, 3]


def test_append_cuts_a_torn_tail_and_reader_names_a_bad_middle_line(tmp_path):
    path = str(tmp_path / "m.jsonl")
    train._append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "x": ' + "9" * 100_000)  # torn, longer than one backward read block
    assert train.read_jsonl(path) == [{"step": 1}]  # a torn last line is skipped
    train._append_jsonl(path, {"step": 2})
    assert open(path).read() == '{"step": 1}\n{"step": 2}\n'
    with open(path, "w") as f:
        f.write('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(train.UserError, match=r"m.jsonl: line 2"):
        train.read_jsonl(path)


# ----------------------------------------------------------------------------------------------
# 4, 5. Non-finite weights; another configuration


def test_huge_lr_stops_without_saving_poisoned_weights(run):
    """--lr 1e30: the first update leaves weights near 1e30, the second overflows them to inf. The run stops
    at that update; ckpt-000002 stays the newest checkpoint, finite, and no step 3 is logged."""
    from safetensors.torch import load_file
    out, resume = run
    with pytest.raises(train.StopRun, match="step 3: the optimizer step made weights inf or NaN"):
        resume("--steps", "4", "--lr", "1e30", "--resume-override")
    assert train.latest_checkpoint(str(out)) == str(out / "ckpt-000002") and _ckpts(out)[-1] == "ckpt-000002"
    assert all(torch.isfinite(t).all() for t in load_file(out / "ckpt-000002" / "model.safetensors").values())
    assert _steps(out) == [1, 2]
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 1e30 and config["overrides"] == [{"from_step": 2, "lr": {"was": 3e-4, "now": 1e30}}]


@pytest.mark.parametrize("lr", ["inf", "nan", "-1", "0"])
def test_lr_must_be_finite_and_positive(lr, tmp_path):
    with pytest.raises(train.UserError, match=f"--lr {lr}|--lr {float(lr)}"):
        train.check_args(train.parse_args(["--lr", lr, "--out", str(tmp_path)]))


def test_resume_with_other_flags_is_refused_unless_overridden(run, capsys):
    out, resume = run
    before = {n: os.path.getmtime(out / n) for n in ("metrics.jsonl", "config.json")}
    with pytest.raises(train.UserError, match=r"--method grpo -> tempo, --seed 0 -> 3; pass --resume-override"):
        resume("--steps", "3", "--method", "tempo", "--seed", "3")
    assert {n: os.path.getmtime(out / n) for n in before} == before and _steps(out) == [1, 2]
    resume("--steps", "2", "--keep-last", "5", "--save-every", "7", "--no-progress")  # RESUME_FREE fields: accepted
    resume("--steps", "2", "--method", "tempo", "--resume-override")
    assert "continuing with method = tempo (was grpo)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["method"] == "tempo"
    resume("--steps", "2", "--method", "tempo")  # the override is recorded: the run is a tempo run now
    assert set(train.RESUME_FREE) <= {f.name for f in __import__("dataclasses").fields(train.Args)}


# ----------------------------------------------------------------------------------------------
# 13, 14. User errors: one line naming the flag, exit code 2, before anything loads


@pytest.mark.parametrize("argv,flag", [
    (["--tree-children", "1"], "--tree-children 1"), (["--tree-tau", "-1"], "--tree-tau -1"),
    (["--tree-forks", "-1"], "--tree-forks -1"), (["--temperature", "inf"], "--temperature inf"),
    (["--val-limit", "0"], "--val-limit 0"), (["--train-limit", "0"], "--train-limit 0"),
    (["--val-batch-size", "0"], "--val-batch-size 0"), (["--max-nonfinite", "0"], "--max-nonfinite 0"),
    (["--tiny-hidden", "0"], "--tiny-hidden 0"), (["--tiny-hidden", "12"], "--tiny-hidden 12"),
    (["--micro-batch-tokens", "0"], "--micro-batch-tokens 0"), (["--keep-last", "0"], "--keep-last 0"),
    (["--warm-batch", "0"], "--warm-batch 0"), (["--clip-high", "nan"], "--clip-high nan"),
    (["--dist-timeout", "0"], "--dist-timeout 0"), (["--resume-override"], "--resume-override"),
    (["--data", "/nonexistent.jsonl"], "--data"),
    # the sampler's own checks (rollout.check_config), named by train.py's flags
    (["--top-p", "1.5"], "--top-p 1.5"), (["--kv-budget", "5"], "--kv-budget 5"), (["--page-size", "0"], "--page-size 0"),
    (["--sampler", "tree", "--tree-chains", "9"], "--tree-chains 9"),
])
def test_user_errors_are_one_line_naming_the_flag(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "setup_distributed", lambda *a: pytest.fail("the checks must come first"))
    assert train.cli(["--model", "tiny", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: {flag}") and err.count("\n") == 1, err


def test_a_bad_data_row_is_one_line_naming_file_and_line(tmp_path, capsys):
    """--data goes through evaluate.load_examples' checks (every row, by file and line), as a user error."""
    data = tmp_path / "add.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n{"question": \n')
    assert train.cli(["--model", "tiny", "--task", "add", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: --data {data}: line 2") and err.count("\n") == 1, err


def test_command_line_device_cuda_without_cuda_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is there")
    res = subprocess.run([sys.executable, "train.py", "--device", "cuda", "--out", str(tmp_path)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr == "train.py: error: --device cuda: no CUDA device visible\n", res.stderr


def test_torchrun_user_error_is_one_line(tmp_path):
    """Under torchrun every rank finds the same user error before joining the process group: rank 0 prints it,
    once, and exits 2 (the others wait to be stopped); torchrun's own failure report follows, with no train.py
    frame. Fails if each rank prints its line, or if rank 0 is stopped before it prints."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--tiny-hidden", "0", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and out.count("train.py: error: --tiny-hidden 0: must be at least 8") == 1, out
    assert "train.py\", line" not in out and "exitcode  : 2" in out, out


# ----------------------------------------------------------------------------------------------
# 7. A hung rank ends the run, naming the phase. About a minute: two processes start, and the timeout is 15 s
#    (it also bounds the setup's barriers, which wait for rank 0 to read the model: less is flaky on a busy CPU)


def test_a_hung_rank_ends_the_run_naming_the_phase(tmp_path, tiny_model_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *_flags(tmp_path / "o", tiny_model_dir, "--steps", "3", "--dist-timeout", "0.25")]
    t = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env={**ENV, "TRAIN_TEST_HANG": "1:2"}, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "TRAIN_TEST_HANG: hanging at step 2" in out, out[-3000:]
    assert ("train.py: stopped: rank 0, step 2, phase advantages (gathering every rank's rollout): a collective "
            "waited longer than --dist-timeout 0.25 min") in out, out[-3000:]
    assert _steps(tmp_path / "o") == [1] and train.latest_checkpoint(str(tmp_path / "o")).endswith("ckpt-000001")
    assert time.time() - t < 240
