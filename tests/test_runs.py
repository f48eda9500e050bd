"""Tests of train.py across processes: what a killed or corrupted run does on --resume, the one-line messages as a
user sees them (`python train.py`, torchrun), the same run on 1 and 2 gloo ranks (DDP and FSDP2) and a hung rank.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import rollout
import train
from test_train import ENV, ROOT, assert_same_checkpoint, random_batch, small, stable

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def steps(out, name="metrics.jsonl"):
    return [r["step"] for r in train.read_jsonl(os.path.join(out, name))]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """A finished 2-step run with a checkpoint after each step, metrics and samples of steps 1-2."""
    out = tmp_path_factory.mktemp("base") / "run"
    train.train(train.parse_args(small(out, tiny_model_dir, "--steps", "2", "--save-every", "1", "--keep-last", "2",
                                       "--sample-every", "1")))
    assert [os.path.basename(c) for c in train.checkpoint_dirs(str(out))] == ["ckpt-000001", "ckpt-000002"]
    return out


def resume(base, tmp_path, tiny_model_dir, *extra):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out, lambda: train.train(train.parse_args(small(out, tiny_model_dir, "--resume", "--save-every", "1",
                                                           "--keep-last", "2", "--sample-every", "1", *extra)))


def test_a_kill_before_the_rename_and_a_torn_log_line_resume_cleanly(base, tmp_path, tiny_model_dir, capsys):
    """A kill mid-checkpoint leaves ckpt-N.tmp (never resumed from) and maybe a step logged after the checkpoint
    and a torn last line: --resume takes the newest renamed checkpoint, logs no step twice, skips the torn line."""
    out, go = resume(base, tmp_path, tiny_model_dir, "--steps", "3")
    os.rename(out / "ckpt-000002", out / "ckpt-000002.tmp")
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"step": 2, "torn')
    go()
    assert f"resumed from {out / 'ckpt-000001'} at step 1" in capsys.readouterr().out
    assert steps(out) == [1, 2, 3] and steps(out, "samples.jsonl") == [1, 2, 3]
    assert stable(train.read_metrics(out))[:2] == stable(train.read_metrics(base))  # step 2 redone exactly


def test_a_corrupted_newest_checkpoint_is_one_line_naming_the_older_one(base, tmp_path, tiny_model_dir):
    out, go = resume(base, tmp_path, tiny_model_dir, "--steps", "3")
    for f in os.listdir(out / "ckpt-000002" / "state"):
        if f.endswith(".distcp"):
            (out / "ckpt-000002" / "state" / f).write_bytes(b"garbage")
    with pytest.raises(train.UserError, match=f"{out / 'ckpt-000002'} does not load .*resume from {out / 'ckpt-000001'}"):
        go()
    assert steps(out) == [1, 2] and len(train.checkpoint_dirs(str(out))) == 2  # nothing changed


def test_a_fresh_run_into_a_used_out_is_refused_and_resume_of_an_empty_out_starts(base, tmp_path, tiny_model_dir,
                                                                                  capsys):
    assert train.cli(small(base, tiny_model_dir, "--steps", "1")) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    train.train(train.parse_args(small(tmp_path / "new", tiny_model_dir, "--steps", "1", "--resume")))
    assert "holds no checkpoint yet; starting fresh" in capsys.readouterr().out and steps(tmp_path / "new") == [1]


def test_a_bad_data_row_is_one_line_naming_file_and_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+2=", "answer": "3"}\n{"question": "2+2="}\n')
    assert train.cli(["--model", "tiny", "--task", "add", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: --data {data}: line 2") and err.count("\n") == 1, err


def test_command_line_device_cuda_without_cuda_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = subprocess.run([sys.executable, "train.py", "--device", "cuda", "--out", str(tmp_path)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr == "train.py: error: --device cuda: no CUDA device visible\n", res.stderr


def test_torchrun_user_error_is_one_line(tmp_path):
    """Every rank finds the same user error before joining the process group: rank 0 prints it once and exits 2
    (the others wait to be stopped); fails if each rank prints it, or if rank 0 is stopped before it prints."""
    res = subprocess.run([*TORCHRUN, "train.py", "--tiny-hidden", "0", "--out", str(tmp_path)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=180)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and out.count("train.py: error: --tiny-hidden 0: must be at least 8") == 1, out
    assert "train.py\", line" not in out and "exitcode  : 2" in out, out


# ----------------------------------------------------------------------------------------------
# The same run on 1 and 2 ranks


def assert_same_metrics(one, two):
    """Per-step metrics of a 1- and a 2-process run agree to float tolerance (sums over other shapes round
    differently)."""
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(stable(one), stable(two)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k, a[k], b[k])


TWO_RANKS = {  # batch-wide statistics gathered over ranks (HEPO's top 20%, batch std), tree sampling under FSDP2
    "ddp": ["--method", "hepo", "--scale", "batch", "--kl-coef", "0.05", "--objective", "gspo"],
    "fsdp": ["--method", "treeadv", "--sampler", "tree", "--unique-segments", "--fsdp", "--grad-ckpt"],
}


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_torchrun_two_ranks_equal_one_process(name, warm_dir, tmp_path):
    """The sampler is keyed by a prompt's place in the step and a mini-batch holds the same prompts on any number
    of ranks, so a 2-rank run's metrics (reward, loss, grad norm, KL, validation) equal the 1-process run's."""
    flags = [*small(tmp_path / "two", warm_dir, "--steps", "2", "--save-every", "2", "--val-every", "2",
                    "--val-limit", "16", "--sample-every", "1"), *TWO_RANKS[name]]
    res = subprocess.run([*TORCHRUN, "train.py", *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = train.read_metrics(tmp_path / "two")
    assert [r["step"] for r in rows] == [0, 1, 2] and any(r.get("adv_abs_mean", 0) > 0 for r in rows)
    train.train(train.parse_args([f.replace(str(tmp_path / "two"), str(tmp_path / "one")) for f in flags
                                  if f != "--fsdp"]))
    assert_same_metrics(train.read_metrics(tmp_path / "one"), rows)


GRADS = """
import sys
import torch
import rollout
import train

batch_file, out_file, fsdp = sys.argv[1], sys.argv[2], sys.argv[3] == "fsdp"
args = train.Args(**torch.load(batch_file)["args"], fsdp=fsdp, device="cpu")
worker = train.setup_worker(args)
model = train.place_model(rollout.build_tiny_model(rollout.build_tiny_tokenizer(), hidden=64, layers=2), worker, args,
                          trainable=True)
batch = torch.load(batch_file)["batch"]
rows = [r for p in train.rank_places(worker.rank, 2, 4, 4) for r in range(2 * p, 2 * p + 2)]  # this rank's groups
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=train.WEIGHT_DECAY)
ctx = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
grads, clip = {}, torch.nn.utils.clip_grad_norm_
def capture(params, max_norm):  # the summed gradient, before clipping (AdamW alone would hide a scale error)
    grads.update({n: whole(p.grad).clone() for n, p in train.unwrap(model).named_parameters()})
    return clip(params, max_norm)
torch.nn.utils.clip_grad_norm_ = capture
train.update(model, opt, {k: v[rows] for k, v in batch.items()}, args.lr, args, 2, *train.policy_step(args, ctx))
params = {n: whole(p.detach()).clone() for n, p in train.unwrap(model).named_parameters()}
if worker.rank == 0:
    torch.save({"grads": grads, "params": params}, out_file)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_rank_and_two_ranks_make_the_same_update(tiny_tokenizer, tmp_path, mode, monkeypatch):
    """2 gloo ranks (DDP or FSDP2), each with its share of the mini-batch and the global normaliser, against one
    process with all of it: the summed gradients (before clipping) and the parameters after one AdamW step agree. Dropping `loss * world` (DDP and FSDP2
    average over ranks) or a head gradient missing FSDP2's reduction fails this."""
    args = dict(group_size=2, mini_batch_prompts=4, lr=1e-3, micro_batch_tokens=20, kl_coef=0.05, max_new_tokens=6)
    batch, one = random_batch(), rollout.build_tiny_model(tiny_tokenizer, hidden=64, layers=2).train()
    g = torch.Generator().manual_seed(2)
    noise = lambda: torch.where(batch["response_mask"], -1 + 0.2 * torch.randn(8, 6, generator=g), 0.0)  # noqa
    batch.update(old_logp=noise(), ref_logp=noise(), sampler_logp=noise())
    torch.save({"batch": batch, "args": args}, tmp_path / "batch.pt")
    (tmp_path / "grads.py").write_text(GRADS)
    res = subprocess.run([*TORCHRUN, str(tmp_path / "grads.py"), str(tmp_path / "batch.pt"), str(tmp_path / "two.pt"),
                          mode], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "two.pt").exists(), res.stdout[-2000:] + res.stderr[-4000:]
    a, grads, clip = train.Args(**args), {}, torch.nn.utils.clip_grad_norm_
    opt = torch.optim.AdamW(one.parameters(), lr=a.lr, weight_decay=train.WEIGHT_DECAY)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: grads.update(
        {n: p.grad.clone() for n, p in one.named_parameters()}) or clip(params, max_norm))
    train.update(one, opt, batch, a.lr, a, 1, *train.policy_step(a, lambda: torch.autocast("cpu", enabled=False)))
    two = torch.load(tmp_path / "two.pt")
    assert two["grads"].keys() == grads.keys() and sum(float(g.abs().sum()) for g in grads.values()) > 0
    for n, p in one.named_parameters():
        torch.testing.assert_close(two["grads"][n], grads[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
        torch.testing.assert_close(two["params"][n], p.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")


RESUME = """
import sys
import train

n, out, flags = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
for mode in ("ddp", "fsdp"):
    more = flags + (["--fsdp"] if mode == "fsdp" else [])
    train.train(train.parse_args(more + ["--out", f"{out}/{mode}-straight", "--steps", str(2 * n)]))
    train.train(train.parse_args(more + ["--out", f"{out}/{mode}-resumed", "--steps", str(n)]))
    train.train(train.parse_args(more + ["--out", f"{out}/{mode}-resumed", "--steps", str(2 * n), "--resume"]))
"""


def test_torchrun_ppo_resumes_exactly_and_equals_one_process_ddp_and_fsdp2(warm_dir, tmp_path):
    """Under torchrun, DDP and FSDP2, --method ppo with KL: 1 + 1 steps with --resume == 2 straight (metrics, the
    export, policy, critic and both AdamW states bit for bit; the state written by 2 ranks), and the metrics (the
    critic's included) equal one process's; the export then loads as --model in one process."""
    flags = small(tmp_path / "x", warm_dir, "--method", "ppo", "--kl-coef", "0.05", "--max-new-tokens", "4",
                  "--save-every", "1")[:-2]  # no --out
    (tmp_path / "resume.py").write_text(RESUME)
    res = subprocess.run([*TORCHRUN, str(tmp_path / "resume.py"), "1", str(tmp_path), *flags], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    train.train(train.parse_args([*flags, "--out", str(tmp_path / "one"), "--steps", "2"]))
    one = train.read_metrics(tmp_path / "one")
    assert all(r["value_loss"] > 0 and r["critic_grad_norm"] > 0 for r in one)
    for mode in ("ddp", "fsdp"):
        a, b = train.read_metrics(tmp_path / f"{mode}-straight"), train.read_metrics(tmp_path / f"{mode}-resumed")
        assert [r["step"] for r in b] == [1, 2] and stable(a) == stable(b)
        assert_same_metrics(one, a)
        assert_same_checkpoint(*(train.latest_checkpoint(str(tmp_path / f"{mode}-{x}")) for x in ("straight", "resumed")))
    again = train.latest_checkpoint(str(tmp_path / "fsdp-straight"))
    train.train(train.parse_args(small(tmp_path / "again", again, "--steps", "1", "--save-every", "0")))


UNEVEN = """
import torch
import rollout
import train

args = train.Args(device="cpu", fsdp=True, grad_ckpt=False)
worker = train.setup_worker(args)
m = train.place_model(rollout.build_tiny_model(rollout.build_tiny_tokenizer()), worker, args, trainable=True)
with train.sampling_mode(m) as policy, torch.no_grad():
    for _ in range(1 + 3 * worker.rank):  # rank 0 one forward, rank 1 four: rows finishing at different times
        policy(input_ids=torch.tensor([[3, 4, 5]]))
m(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()  # FSDP's collectives must still line up
torch.distributed.barrier()
print("uneven forwards ok", flush=True)
torch.distributed.destroy_process_group()
"""


def test_fsdp_sampling_survives_uneven_forward_counts(tmp_path):
    """Without sampling_mode's unshard, FSDP2 all-gathers in every forward and this hangs or aborts."""
    (tmp_path / "uneven.py").write_text(UNEVEN)
    res = subprocess.run([*TORCHRUN, str(tmp_path / "uneven.py")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=180)
    assert res.stdout.count("uneven forwards ok") == 2, res.stdout[-2000:] + res.stderr[-3000:]


def test_a_hung_rank_ends_the_run_naming_the_step(tmp_path, tiny_model_dir):
    """A rank that stops answering (here: SIGSTOP, as a frozen GPU would) makes the others' next collective time
    out after --dist-timeout: the run ends with one line naming the step, and its last checkpoint stands."""
    out = tmp_path / "o"
    proc = subprocess.Popen([*TORCHRUN, "train.py", *small(out, tiny_model_dir, "--steps", "50", "--save-every", "1",
                                                           "--dist-timeout", "0.25")],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and train.checkpoint_dirs(str(out))):
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    frozen = int(workers[-1])
    os.kill(frozen, signal.SIGSTOP)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(frozen, sig)
    assert proc.returncode != 0 and "train.py: stopped: step" in output, output[-3000:]
    assert "a collective failed" in output and "--dist-timeout 0.25 min" in output, output[-3000:]
    assert train.latest_checkpoint(str(out)) is not None
