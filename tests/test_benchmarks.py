"""The two benchmarks of train.py at toy sizes, in-process, so that a change to train.py cannot silently break
them: each runs through its command line, and what it prints rests on properties checked here (never timings)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_step  # noqa: E402
import bench_update  # noqa: E402
import train  # noqa: E402

TOY = ["--tiny-hidden", "32", "--tiny-layers", "1", "--prompts-per-step", "4", "--mini-batch-prompts", "4",
       "--group-size", "2", "--max-new-tokens", "8", "--steps", "2"]


@pytest.mark.parametrize("shape", ["tiny", "0.6b"])
def test_bench_step_runs_in_a_fresh_out_and_reports_every_phase(shape, tmp_path, monkeypatch):
    """Catches: a call into an API train.py no longer has; an OUT reused (train.py refuses one that holds a run) or
    left behind; a random shape whose EOS the sampler does not know. `0.6b` at toy widths, the real vocabulary."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setitem(bench_step.SHAPES, "0.6b", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    for _ in range(2 if shape == "tiny" else 1):
        res = bench_step.main(["--shape", shape, *TOY])
        assert res.keys() == {*bench_step.KEYS, "peak_mem_gb"}
        assert not [n for n in os.listdir(tmp_path) if n.startswith("bench-step-")]
        assert 1 <= res["response_len"] <= 8 and res["tokens_per_s"] > 0 and res["peak_mem_gb"] > 0
    if shape != "tiny":  # random weights over 151,936 tokens: every response runs to the budget
        assert res["response_len"] == 8


def test_bench_update_chunked_head_matches_plain_without_vocabulary_sized_saves_and_pads_each_row_once(capsys):
    """Catches: the chunked head saving [.., V] tensors or peaking as high as the plain one (at T = 2,048, two
    chunks); the two heads disagreeing; a micro-batch plan that drops, repeats or moves a row across mini-batches,
    or that packs fewer positions than the rows hold."""
    out = bench_update.main(["--quick"])
    case = out["logprob"][2048]
    plain, chunked = case["plain"], case["chunked"]
    assert chunked["saved_vocab"] == 0 < plain["saved_vocab"] and chunked["peak"] < plain["peak"]
    assert case["lp_diff"] < 1e-4 and case["grad_diff"] < 1e-5 * case["grad_max"]
    pad, args = out["padding"], train.Args()
    mini = args.mini_batch_prompts // bench_update.WORLD * args.group_size
    for name, plan in pad["plans"].items():
        assert sorted(i for rows in plan for i in rows) == list(range(pad["rows"])), name
        assert all(len({i // mini for i in rows}) == 1 for rows in plan), name
        assert sum(pad["positions"][name]) >= pad["real"], name
    budget = next(k for k in pad["plans"] if k.startswith("train.micro_batches"))
    assert all(len(rows) <= args.micro_batch_rows and (n <= args.micro_batch_tokens or len(rows) == 1)
               for rows, n in zip(pad["plans"][budget], pad["positions"][budget]))
    assert "same result" in capsys.readouterr().out
