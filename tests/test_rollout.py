"""rollout.sample: the sampling distribution, counter-based randomness, the decode loop and the tree.

Layers: hand-computed cases for the small pure functions (top-k/top-p, inverse CDF, the hash against
a plain-Python splitmix64, the fork rule, the default KV budget); equivalence of recorded log-probs/entropy
with a fresh forward pass; properties of tree sampling over random small configurations and KV budgets
(hypothesis); tiny-model end to end (determinism, batch independence, EOS, max_new_tokens, greedy, the
same tokens whatever the budget and with compile, cache bytes and copies counted by hand, bad input).

A random tiny model is near-uniform (entropy ~ln 100 = 4.6 nats everywhere); tests that need peaked
distributions or likely/impossible EOS add a hook on lm_head that scales or biases the logits.
"""
import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

import rollout
from rollout import SamplingConfig, sample


# ----------------------------------------------------------------------------------------------
# Helpers


def _ids(tok, *texts):
    return [tok(t).input_ids for t in texts]


def _run(model, tok, prompts, G, seed=0, **cfg):
    return sample(model, prompts, G, SamplingConfig(**cfg), eos_token_ids=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, seed=seed)


def _logits_hook(model, scale=1.0, bias=None):
    """A copy of the model whose logits are scale * logits + bias (peaked, or EOS made likely/impossible)."""
    m = copy.deepcopy(model)
    m.lm_head.register_forward_hook(lambda mod, inp, out: out * scale + (0 if bias is None else bias))
    return m


def _rows(r, prompts, G):
    """Per row: (prompt ids, response ids) without padding."""
    out = []
    for b in range(r.response_ids.shape[0]):
        n = int(r.response_mask[b].sum())
        out.append((prompts[b // G], r.response_ids[b, :n].tolist()))
    return out


def _fresh_logits(model, prompt, response):
    """Logits predicting each response token, from one forward pass over prompt + response (no cache)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # [Tp + n, V]
    return logits[len(prompt) - 1: len(prompt) + len(response) - 1]  # [n, V]


def _check_leaf_invariants(r, prompts, G, cfg):
    """Exactly G leaves per prompt, full sequences, shared prefixes token for token, counters exact."""
    B = len(prompts) * G
    assert r.response_ids.shape[0] == B and r.logprobs.shape == r.response_ids.shape == r.entropy.shape
    assert torch.equal(r.group_index, torch.arange(B) // G)
    lengths = r.response_mask.sum(1)
    assert bool((lengths >= 1).all()) and bool((lengths <= cfg.max_new_tokens).all())
    # prefix mask; padding is pad with zero log-prob and entropy
    T = r.response_mask.shape[1]
    assert torch.equal(r.response_mask, torch.arange(T) < lengths[:, None])
    assert bool((r.logprobs[~r.response_mask] == 0).all()) and bool((r.entropy[~r.response_mask] == 0).all())
    # finished <=> the last token is EOS; no EOS before it; unfinished rows ran to max_new_tokens
    eos = r.response_ids[torch.arange(B), lengths - 1] == EOS_ID
    assert torch.equal(r.finished, eos)
    assert bool((lengths[~r.finished] == cfg.max_new_tokens).all())
    for b in range(B):
        assert EOS_ID not in r.response_ids[b, : int(lengths[b]) - 1].tolist()
    # branches repeat their parent's tokens, log-probs and entropies before the fork point
    decoded_expected = 0
    for b in range(B):
        p, t = int(r.parent[b]), int(r.branch_pos[b])
        if p < 0:
            assert t == 0
            decoded_expected += int(lengths[b]) - 1
        else:
            assert p // G == b // G and p < b  # same prompt, made before it
            assert int(lengths[p]) > t
            assert torch.equal(r.response_ids[b, :t], r.response_ids[p, :t])
            assert torch.equal(r.logprobs[b, :t], r.logprobs[p, :t])
            assert torch.equal(r.entropy[b, : t + 1], r.entropy[p, : t + 1])  # same distribution at t
            assert r.entropy[p, t] > cfg.tau
            decoded_expected += int(lengths[b]) - 1 - t
    # each shared position is decoded once; each prompt is prefilled once
    assert r.decoded_tokens == decoded_expected
    # sequential steps: at least the longest leaf's own decode, at most every row's (no row waits for nothing)
    assert int(lengths.max()) - 1 <= r.decode_steps <= decoded_expected
    assert r.prefilled_tokens == sum(len(q) for q in prompts)
    assert torch.equal(r.prompt_mask.sum(1), torch.tensor([len(q) for q in prompts]).repeat_interleave(G))
    # two-level trees: a branch's parent is one of the prompt's M root chains (fork_rule: branches never fork)
    M = cfg.num_chains if not math.isinf(cfg.tau) else G
    for b in range(B):
        p = int(r.parent[b])
        assert p < 0 or (int(r.parent[p]) == -1 and p % G < M)
    # fork limits: children per fork point, forks per prompt
    points = {}
    for b in range(B):
        if int(r.parent[b]) >= 0:
            points.setdefault((int(r.parent[b]), int(r.branch_pos[b])), []).append(b)
    assert all(len(v) <= cfg.max_children - 1 for v in points.values())
    for g in range(len(prompts)):
        n_forks = sum(1 for (p, _) in points if p // G == g)
        assert n_forks == int(r.forks_made[g])
        if cfg.max_forks:
            assert n_forks <= cfg.max_forks


EOS_ID = 2  # the tiny tokenizer's <|im_end|>; checked in test_eos_id_matches


def test_eos_id_matches(tiny_tokenizer):
    assert tiny_tokenizer.eos_token_id == EOS_ID


# ----------------------------------------------------------------------------------------------
# Hand-computed: the sampling distribution, inverse CDF, the counter-based hash


def test_sampling_logprobs_top_k_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    lp = rollout.sampling_logprobs(logits, temperature=1.0)
    assert torch.allclose(lp.exp(), torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    # top_k = 2 keeps 0.4 and 0.3, renormalised to 4/7 and 3/7
    lp = rollout.sampling_logprobs(logits, 1.0, top_k=2)
    assert torch.allclose(lp.exp(), torch.tensor([[0, 4 / 7, 0, 3 / 7]]))
    # top_p = 0.7: 0.4 (mass before 0) and 0.3 (mass before 0.4 < 0.7) kept; 0.2 has 0.7 before it
    lp = rollout.sampling_logprobs(logits, 1.0, top_p=0.7)
    assert torch.allclose(lp.exp(), torch.tensor([[0, 4 / 7, 0, 3 / 7]]))
    # top_p = 0.71 also keeps 0.2
    assert torch.allclose(rollout.sampling_logprobs(logits, 1.0, top_p=0.71).exp(), torch.tensor([[0, 4 / 9, 2 / 9, 3 / 9]]))
    # temperature 0.5 squares the probabilities before renormalising
    q = torch.tensor([0.01, 0.16, 0.04, 0.09])
    assert torch.allclose(rollout.sampling_logprobs(logits, 0.5).exp(), (q / q.sum())[None])
    # greedy: the T = 1 distribution, untouched by top_k/top_p
    assert torch.allclose(rollout.sampling_logprobs(logits, 0.0, top_p=0.1, top_k=1), torch.log_softmax(logits, -1))
    # entropy over the kept set: two tokens 4/7, 3/7
    h = rollout.entropy_of(rollout.sampling_logprobs(logits, 1.0, top_k=2))
    assert torch.allclose(h, torch.tensor([-(4 / 7) * math.log(4 / 7) - (3 / 7) * math.log(3 / 7)]))


def test_inverse_cdf_by_hand_and_exact_on_a_grid():
    p = torch.tensor([[0.2, 0.0, 0.5, 0.3]])
    u = torch.tensor([[0.0, 0.1999, 0.2001, 0.6999, 0.7001, 0.9999999]], dtype=torch.float64)
    assert rollout.inverse_cdf(p, u).tolist() == [[0, 0, 2, 2, 3, 3]]
    # an equally spaced grid of N uniforms hits each token exactly N * p times; zero mass never
    N = 1000
    grid = ((torch.arange(N, dtype=torch.float64) + 0.5) / N)[None]
    counts = torch.bincount(rollout.inverse_cdf(p, grid)[0], minlength=4)
    assert counts.tolist() == [200, 0, 500, 300]
    # the last token of positive mass is never passed over, even at u -> 1 and with zeros at the end
    p2 = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert rollout.inverse_cdf(p2, torch.tensor([[1 - 2.0**-53]], dtype=torch.float64)).item() == 1


def _splitmix_py(seed, prompt, lane, pos):
    """The counter-based uniform in plain Python integers (the readable twin of counter_uniform)."""
    M = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    s = mix((seed + 0x9E3779B97F4A7C15) & M)
    return (mix(mix(s ^ prompt) ^ (((lane << 24) | pos) & M)) >> 11) / 2.0**53


def test_counter_uniform_matches_plain_python_and_is_uniform():
    prompt = torch.tensor([[0], [3], [7], [123456]])
    lane = torch.tensor([[0, 1 << 32], [5, 6], [2, (1 << 32) + 2], [9, 10]])
    pos = torch.tensor([[0], [11], [4095], [7]])
    for seed in (0, 1, 2**40 + 3):
        u = rollout.counter_uniform(seed, prompt, lane, pos)
        want = [[_splitmix_py(seed, int(prompt[i, 0]), int(lane[i, j]), int(pos[i, 0])) for j in range(2)] for i in range(4)]
        assert u.tolist() == want
    # uniform in [0, 1): moments of 100k draws, and no two neighbouring counters alike
    n = torch.arange(100_000)
    u = rollout.counter_uniform(0, torch.zeros_like(n), n % 8, n // 8)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01


def test_fork_rule_by_hand():
    H = [0.1, 0.9, 0.6, 0.7, 0.2, 0.95, 0.5]  # positions above tau = 0.5: 1, 2, 3, 5 (0.5 itself is not above)
    # G = 8, M = 2, binary forks: 6 forks dealt 3 and 3; root 0 forks at its 3 highest, shallowest first
    assert rollout.fork_rule(H, 0, G=8, M=2, C=2, max_forks=0, tau=0.5) == ([(1, 1), (3, 1), (5, 1)], 0, 2)
    assert rollout.fork_rule(H, 1, G=8, M=2, C=2, max_forks=0, tau=0.5)[2] == 5  # root 1's leaves follow root 0's
    # too few positions above tau: the dealt leaves left over start as fresh chains
    assert rollout.fork_rule([0.1, 0.6], 0, G=8, M=2, C=2, max_forks=0, tau=0.5) == ([(1, 1)], 2, 2)
    # max_children 3, one root: 7 leaves on 4 forks (2, 2, 2, 1), the deepest fork takes the remainder
    assert rollout.fork_rule(H, 0, G=8, M=1, C=3, max_forks=0, tau=0.5) == ([(1, 2), (2, 2), (3, 2), (5, 1)], 0, 1)
    # max_forks 3 of the 5 extra leaves: forks dealt 2 and 1, the 2 leaves no fork carries dealt 1 and 1
    assert rollout.fork_rule(H, 0, G=7, M=2, C=2, max_forks=3, tau=0.5) == ([(1, 1), (5, 1)], 1, 2)
    assert rollout.fork_rule(H, 1, G=7, M=2, C=2, max_forks=3, tau=0.5) == ([(5, 1)], 1, 5)
    # ties go to the earlier position; tau = 0 takes any position with mass on more than one token
    assert rollout.fork_rule([0.3, 0.3, 0.3], 0, G=3, M=1, C=2, max_forks=0, tau=0.0) == ([(0, 1), (1, 1)], 0, 1)
    assert rollout.fork_rule([0.0, 0.2], 0, G=2, M=1, C=2, max_forks=0, tau=0.0) == ([(1, 1)], 0, 1)
    # G = M: nothing to deal
    assert rollout.fork_rule(H, 0, G=2, M=2, C=2, max_forks=0, tau=0.0) == ([], 0, 2)


def test_default_kv_budget_arithmetic(tiny_model, monkeypatch):
    """Free memory counts what the caching allocator holds unused; off come AdamW's first states, autocast's copies
    of the weights (under autocast), the step's [rows, V] tensors and one layer's gathered pages (every row at the
    longest); 90% of the rest, in bytes per cached position."""
    from transformers import Qwen3Config

    qwen3_1_7b = Qwen3Config(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                             head_dim=128, vocab_size=151_936)
    assert rollout.kv_bytes_per_position(type("M", (), {"config": qwen3_1_7b})(), torch.bfloat16) == 112 * 1024
    bpp = rollout.kv_bytes_per_position(tiny_model)  # 2 layers x (K, V) x 2 heads x 16 x 4 bytes
    assert bpp == 2 * 2 * 2 * 16 * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000_000, 80_000_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3_000_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2_000_000)
    opt = torch.optim.AdamW(tiny_model.parameters())
    n_params, V, rows, longest = sum(p.numel() for p in tiny_model.parameters()), tiny_model.config.vocab_size, 16, 40
    budget = lambda: rollout.default_kv_budget(tiny_model, rows=rows, optimizer=opt, longest=longest)  # noqa: E731
    want = int(0.9 * (11_000_000 - 8 * n_params - 24 * rows * V - rows * longest * bpp // 2)) // bpp
    assert budget() == want
    # bf16 autocast: half the bytes a position, and bf16 copies of every nn.Linear weight (lm_head's is the embedding)
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 100 * 64  # layers x (q, k, v, o, MLP); lm_head
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert budget() == int(0.9 * (11_000_000 - 8 * n_params - 2 * linear - 24 * rows * V
                                      - rows * longest * bpp // 4)) // (bpp // 2)
    # once AdamW holds its states (after the first update), they are in the allocated memory already
    opt.state[next(tiny_model.parameters())] = {"step": 1}
    assert budget() == int(0.9 * (11_000_000 - 24 * rows * V - rows * longest * bpp // 2)) // bpp


# ----------------------------------------------------------------------------------------------
# Recorded log-probs and entropy equal a fresh forward pass; the distribution is the one asked for


PROMPTS = ("12+34=", "1+2+3+4+5+6+7=", "99+1=")  # different lengths: left padding in the batch


@pytest.mark.parametrize("cfg", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9, top_k=20),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, sampler="tree", tau=0.0),
    dict(temperature=0.8, top_p=0.95, sampler="tree", tau=1.0, num_chains=1, max_children=3),
])
def test_logprobs_and_entropy_equal_a_fresh_forward(tiny_model, tiny_tokenizer, cfg):
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    G = 4
    r = _run(tiny_model, tiny_tokenizer, prompts, G, seed=3, max_new_tokens=24, **cfg)
    c = SamplingConfig(max_new_tokens=24, **cfg)
    for b, (q, resp) in enumerate(_rows(r, prompts, G)):
        logp = rollout.sampling_logprobs(_fresh_logits(tiny_model, q, resp), c.temperature, c.top_p, c.top_k)
        n = len(resp)
        want = logp.gather(1, torch.tensor(resp)[:, None])[:, 0]
        assert torch.isfinite(want).all()  # every sampled token lies in the kept set
        torch.testing.assert_close(r.logprobs[b, :n], want, atol=1e-4, rtol=0)
        torch.testing.assert_close(r.entropy[b, :n], rollout.entropy_of(logp), atol=1e-4, rtol=0)
        if c.top_p == 1.0 and c.top_k == 0:  # the papers' setting: exactly train.py's log_softmax(logits / T)
            full = torch.log_softmax(_fresh_logits(tiny_model, q, resp) / c.temperature, -1)
            torch.testing.assert_close(r.logprobs[b, :n], full.gather(1, torch.tensor(resp)[:, None])[:, 0],
                                       atol=1e-4, rtol=0)


def test_first_token_frequencies_follow_the_distribution(tiny_model, tiny_tokenizer):
    """8000 first tokens of one prompt against the restricted softmax: within 5 sigma per token, 0 outside."""
    prompts = _ids(tiny_tokenizer, "12+34=")
    G = 8000
    for cfg in (dict(temperature=1.0), dict(temperature=0.5, top_k=7, top_p=0.8)):
        r = _run(tiny_model, tiny_tokenizer, prompts, G, seed=11, max_new_tokens=1, **cfg)
        c = SamplingConfig(max_new_tokens=1, **cfg)
        p = rollout.sampling_logprobs(_fresh_logits(tiny_model, prompts[0], [0]), c.temperature, c.top_p, c.top_k)[0].exp()
        freq = torch.bincount(r.response_ids[:, 0], minlength=p.numel()).double() / G
        sd = (p.double() * (1 - p.double()) / G).sqrt()
        assert bool(((freq - p.double()).abs() <= 5 * sd + 1e-12).all())
        assert bool((freq[p == 0] == 0).all())
        assert r.decoded_tokens == 0 and r.prefilled_tokens == len(prompts[0])


# ----------------------------------------------------------------------------------------------
# The decode loop end to end: determinism, batch independence, greedy, EOS, max_new_tokens


def test_seeded_determinism(tiny_model, tiny_tokenizer):
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    for sampler in ("flat", "tree"):
        a = _run(tiny_model, tiny_tokenizer, prompts, 4, seed=5, max_new_tokens=16, sampler=sampler)
        b = _run(tiny_model, tiny_tokenizer, prompts, 4, seed=5, max_new_tokens=16, sampler=sampler)
        c = _run(tiny_model, tiny_tokenizer, prompts, 4, seed=6, max_new_tokens=16, sampler=sampler)
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
        assert torch.equal(a.parent, b.parent) and a.decoded_tokens == b.decoded_tokens
        assert not torch.equal(a.response_ids, c.response_ids)
        # the model's global RNG is not touched
        torch.manual_seed(0); x = torch.rand(2)
        _run(tiny_model, tiny_tokenizer, prompts, 2, seed=7, max_new_tokens=4, sampler=sampler)
        torch.manual_seed(0); assert torch.equal(torch.rand(2), x)


def test_same_tokens_alone_and_in_a_batch_with_longer_prompts(tiny_model, tiny_tokenizer):
    short = _ids(tiny_tokenizer, "7+8=")
    batch = short + _ids(tiny_tokenizer, "11+22+33+44+55=", "123456789+987654321=")
    G = 4
    for cfg in (dict(), dict(temperature=0.9, top_p=0.9), dict(sampler="tree", tau=0.0),
                dict(sampler="tree", num_chains=1, max_children=3)):
        alone = _run(tiny_model, tiny_tokenizer, short, G, seed=2, max_new_tokens=20, **cfg)
        mixed = _run(tiny_model, tiny_tokenizer, batch, G, seed=2, max_new_tokens=20, **cfg)
        T = alone.response_ids.shape[1]
        assert torch.equal(alone.response_ids, mixed.response_ids[:G, :T])
        assert not mixed.response_mask[:G, T:].any()
        assert torch.equal(alone.parent, mixed.parent[:G]) and torch.equal(alone.branch_pos, mixed.branch_pos[:G])
        torch.testing.assert_close(alone.logprobs, mixed.logprobs[:G, :T], atol=1e-5, rtol=0)


def test_prompt_keys_key_the_randomness_not_the_batch_position(tiny_model, tiny_tokenizer):
    """train.py keys a prompt by its place in the whole step: a rank holding prompts 2 and 3 of a step
    samples what one process holding all four samples for them."""
    prompts = _ids(tiny_tokenizer, *PROMPTS, "5+5=")
    for cfg in (dict(), dict(sampler="tree", tau=0.0)):
        whole = sample(tiny_model, prompts, 3, SamplingConfig(max_new_tokens=12, **cfg), eos_token_ids=EOS_ID,
                       pad_token_id=0, seed=3)
        part = sample(tiny_model, prompts[2:], 3, SamplingConfig(max_new_tokens=12, **cfg), eos_token_ids=EOS_ID,
                      pad_token_id=0, seed=3, prompt_keys=[2, 3])
        unkeyed = sample(tiny_model, prompts[2:], 3, SamplingConfig(max_new_tokens=12, **cfg), eos_token_ids=EOS_ID,
                         pad_token_id=0, seed=3)
        T = part.response_ids.shape[1]
        assert torch.equal(part.response_ids, whole.response_ids[6:, :T])
        assert not torch.equal(unkeyed.response_ids[:, :4], part.response_ids[:, :4])


def test_greedy_is_argmax_and_top_k_1_is_greedy(tiny_model, tiny_tokenizer):
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    g = _run(tiny_model, tiny_tokenizer, prompts, 2, max_new_tokens=12, temperature=0.0)
    k1 = _run(tiny_model, tiny_tokenizer, prompts, 2, seed=9, max_new_tokens=12, temperature=1.0, top_k=1)
    assert torch.equal(g.response_ids, k1.response_ids) and torch.equal(g.response_mask, k1.response_mask)
    for b, (q, resp) in enumerate(_rows(g, prompts, 2)):
        logits = _fresh_logits(tiny_model, q, resp)
        assert resp == logits.argmax(-1).tolist()
        torch.testing.assert_close(g.logprobs[b, : len(resp)], torch.log_softmax(logits, -1).max(-1).values, atol=1e-4, rtol=0)
        assert bool((k1.logprobs[b, : len(resp)] == 0).all())  # top_k = 1: the kept set is one token
    assert torch.equal(g.response_ids[0::2], g.response_ids[1::2])  # greedy: every row of a group alike


def test_eos_stops_a_row(tiny_model, tiny_tokenizer):
    V = tiny_model.config.vocab_size
    bias = torch.zeros(V); bias[EOS_ID] = 3.0  # EOS about 20x likelier than another token: ~1 in 6 per step
    m = _logits_hook(tiny_model, bias=bias)
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    for sampler in ("flat", "tree"):
        cfg = SamplingConfig(max_new_tokens=40, sampler=sampler, tau=0.0)
        r = _run(m, tiny_tokenizer, prompts, 6, seed=1, **vars(cfg))
        assert r.finished.float().mean() > 0.5  # most rows ended on EOS, at their own length
        _check_leaf_invariants(r, prompts, 6, cfg)
        lengths = r.response_mask.sum(1)
        assert len(set(lengths[r.finished].tolist())) > 3


def test_max_new_tokens_holds_when_eos_is_impossible(tiny_model, tiny_tokenizer):
    V = tiny_model.config.vocab_size
    bias = torch.zeros(V); bias[EOS_ID] = float("-inf")
    m = _logits_hook(tiny_model, bias=bias)
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    for sampler in ("flat", "tree"):
        r = _run(m, tiny_tokenizer, prompts, 3, max_new_tokens=9, sampler=sampler)
        assert r.response_ids.shape[1] == 9 and bool(r.response_mask.all()) and not r.finished.any()
    r = _run(m, tiny_tokenizer, prompts, 3, max_new_tokens=1, sampler="tree", tau=0.0)
    assert r.response_ids.shape == (9, 1) and r.decoded_tokens == r.decode_steps == 0  # one token each, all from the prefill


# ----------------------------------------------------------------------------------------------
# Tree sampling


def test_tau_inf_forks_nothing_and_is_flat_sampling(tiny_model, tiny_tokenizer):
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    flat = _run(tiny_model, tiny_tokenizer, prompts, 5, seed=4, max_new_tokens=16)
    tree = _run(tiny_model, tiny_tokenizer, prompts, 5, seed=4, max_new_tokens=16, sampler="tree", tau=math.inf)
    assert int(tree.forks_made.sum()) == 0 and bool((tree.parent == -1).all())
    assert torch.equal(flat.response_ids, tree.response_ids) and flat.decoded_tokens == tree.decoded_tokens
    # flat: every row starts at once, so the loop runs until the longest ends (its first token is the prefill's)
    assert flat.decode_steps == tree.decode_steps == int(flat.response_mask.sum(1).max()) - 1
    # a tau above every entropy: no forks either; each root chain's dealt leaves start as fresh chains when it ends
    high = _run(tiny_model, tiny_tokenizer, prompts, 5, seed=4, max_new_tokens=16, sampler="tree", tau=50.0)
    assert int(high.forks_made.sum()) == 0 and bool((high.parent == -1).all())
    assert torch.equal(flat.response_ids, high.response_ids)  # same leaf ids, same counters, same tokens


@pytest.mark.parametrize("G,M,C,max_forks", [(8, 2, 2, 0), (8, 1, 3, 0), (7, 2, 2, 3), (6, 3, 4, 1)])
def test_tau_0_spends_the_fork_budget(tiny_model, tiny_tokenizer, G, M, C, max_forks):
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    V = tiny_model.config.vocab_size
    bias = torch.zeros(V); bias[EOS_ID] = float("-inf")  # no EOS: every row has candidates
    m = _logits_hook(tiny_model, bias=bias)
    cfg = SamplingConfig(max_new_tokens=16, sampler="tree", tau=0.0, num_chains=M, max_children=C, max_forks=max_forks)
    r = _run(m, tiny_tokenizer, prompts, G, seed=8, **vars(cfg))
    _check_leaf_invariants(r, prompts, G, cfg)
    budget = math.ceil((G - M) / (C - 1))
    want_forks = min(budget, max_forks) if max_forks else budget
    assert r.forks_made.tolist() == [want_forks] * len(prompts)
    roots = int((r.parent == -1).sum())
    want_roots = M + max(0, (G - M) - want_forks * (C - 1))  # leaves the forks could not make are root chains
    assert roots == want_roots * len(prompts)


def test_tree_leaves_share_prefixes_and_decode_fewer_tokens(tiny_model, tiny_tokenizer):
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    G = 8
    cfg = SamplingConfig(max_new_tokens=32, sampler="tree")
    tree = _run(tiny_model, tiny_tokenizer, prompts, G, seed=0, **vars(cfg))
    flat = _run(tiny_model, tiny_tokenizer, prompts, G, seed=0, max_new_tokens=32)
    _check_leaf_invariants(tree, prompts, G, cfg)
    assert tree.prefilled_tokens == flat.prefilled_tokens == sum(map(len, prompts))  # no prefix prefilled twice
    assert tree.decoded_tokens < flat.decoded_tokens
    # the trie sees the sharing: every branch agrees with its parent on its first branch_pos tokens
    assert int(tree.branch_pos.sum()) > 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(G=st.integers(1, 7), M=st.integers(1, 7), C=st.integers(2, 4), max_forks=st.integers(0, 4),
       tau=st.sampled_from([0.0, 0.5, 3.0, 4.4, 4.55, math.inf]), scale=st.sampled_from([1.0, 8.0]),
       eos_bias=st.sampled_from([0.0, 2.5]), max_new=st.integers(1, 12), seed=st.integers(0, 2**31), P=st.integers(1, 3),
       extra=st.sampled_from([None, 0, 3, 40]), page=st.sampled_from([1, 3, 128]))
def test_tree_property_exactly_G_leaves(tiny_model, tiny_tokenizer, G, M, C, max_forks, tau, scale, eos_bias,
                                       max_new, seed, P, extra, page):
    M = min(M, G)
    V = tiny_model.config.vocab_size
    bias = torch.zeros(V); bias[EOS_ID] = eos_bias
    m = _MODELS.setdefault((scale, eos_bias), _logits_hook(tiny_model, scale=scale, bias=bias))
    prompts = _ids(tiny_tokenizer, *PROMPTS[:P])
    cfg = SamplingConfig(max_new_tokens=max_new, sampler="tree", tau=tau, num_chains=M, max_children=C, max_forks=max_forks)
    r = _run(m, tiny_tokenizer, prompts, G, seed=seed, **vars(cfg))
    _check_leaf_invariants(r, prompts, G, cfg)
    if extra is not None:  # a budget of one group and a few pages: other schedule, same leaves, never more cache
        cfg.page_size = page
        cfg.kv_budget = (rollout.group_pages(max(map(len, prompts)), G, max_new, page) + 1 + extra) * page
        small = _run(m, tiny_tokenizer, prompts, G, seed=seed, **vars(cfg))
        _check_leaf_invariants(small, prompts, G, cfg)
        assert torch.equal(small.response_ids, r.response_ids) and torch.equal(small.parent, r.parent)
        assert torch.equal(small.branch_pos, r.branch_pos) and small.decoded_tokens == r.decoded_tokens
        assert small.peak_kv_tokens < small.kv_capacity <= cfg.kv_budget


_MODELS = {}  # hooked model copies reused across hypothesis examples


# ----------------------------------------------------------------------------------------------
# The engine: the KV budget, the cache's bytes and copies, compile


def _engines(monkeypatch):
    """Record every _Engine sample() creates (to read its pool and page counts)."""
    made, init = [], rollout._Engine.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(rollout._Engine, "__init__", spy)
    return made


@pytest.mark.parametrize("eos_bias", [2.0, float("-inf")])  # ragged lengths (pages freed and reused), or none
@pytest.mark.parametrize("cfg", [dict(), dict(sampler="tree", tau=0.0), dict(sampler="tree", num_chains=1, max_children=3)])
def test_same_tokens_whatever_the_kv_budget(tiny_model, tiny_tokenizer, monkeypatch, cfg, eos_bias):
    """A row's tokens depend on its own prefix and counters only: from a budget of one group (the others swapped out
    and back in as it needs pages) to every group at once, the same leaves; the cache never exceeds the budget."""
    V = tiny_model.config.vocab_size
    bias = torch.zeros(V); bias[EOS_ID] = eos_bias
    m = _MODELS.setdefault((1.0, eos_bias), _logits_hook(tiny_model, bias=bias))
    prompts, G, T, page = _ids(tiny_tokenizer, *PROMPTS), 5, 20, 4
    one = (rollout.group_pages(max(map(len, prompts)), G, T, page) + 1) * page  # the smallest budget allowed
    made = _engines(monkeypatch)
    base = _run(m, tiny_tokenizer, prompts, G, seed=4, max_new_tokens=T, **cfg)
    swaps = []
    for budget in (one, one + 5 * page, 2 * one):
        r = _run(m, tiny_tokenizer, prompts, G, seed=4, max_new_tokens=T, kv_budget=budget, page_size=page, **cfg)
        _check_leaf_invariants(r, prompts, G, SamplingConfig(max_new_tokens=T, kv_budget=budget, **cfg))
        assert torch.equal(r.response_ids, base.response_ids) and torch.equal(r.parent, base.parent)
        torch.testing.assert_close(r.logprobs, base.logprobs, atol=1e-5, rtol=0)
        assert r.decoded_tokens == base.decoded_tokens and r.decode_steps >= base.decode_steps
        # the budget in real bytes: what was allocated is the capacity reported, within the budget
        eng = made[-1]
        cache_bytes = eng.pool.numel() * eng.pool.element_size()
        assert cache_bytes == r.kv_capacity * rollout.kv_bytes_per_position(m) <= budget * rollout.kv_bytes_per_position(m)
        assert r.kv_capacity == budget // page * page and r.peak_kv_tokens < r.kv_capacity
        assert sorted(eng.free) == list(range(len(eng.ref))) and not any(eng.ref) and not eng.swapped
        swaps.append(r.kv_traffic["swap"])
    # rows that never end make the smallest budget preempt (the path under test); short rows rarely need to
    assert swaps[0] > 0 or eos_bias == 2.0


def test_cache_traffic_and_peak_by_hand(tiny_model, tiny_tokenizer):
    """Flat, one prompt of p tokens, G = 3, EOS impossible, T new tokens, pages of 4: one prefill of p positions; the
    three rows read the prompt's pages (its partly filled last one too) and write their own T - 1 positions on pages of
    their own, 3 positions a step for T - 1 steps; nothing copied. Held at the end: the prompt's ceil(p / 4) pages and
    per row ceil((T - 1) / 4). Per decoded token the writes do not grow with T."""
    V = tiny_model.config.vocab_size
    bias = torch.zeros(V); bias[EOS_ID] = float("-inf")
    m = _MODELS.setdefault((1.0, "no-eos"), _logits_hook(tiny_model, bias=bias))
    q = _ids(tiny_tokenizer, "1+2+3+4+5=")
    p = len(q[0])
    assert p % 4 == 2
    for T in (8, 40):
        r = _run(m, tiny_tokenizer, q, 3, max_new_tokens=T, page_size=4)
        assert r.kv_traffic == dict(prefill=p, decode=3 * (T - 1), swap=0)
        assert r.decode_steps == T - 1 and r.decoded_tokens == 3 * (T - 1)
        assert r.peak_kv_tokens == 4 * (-(-p // 4) + 3 * -(-(T - 1) // 4))
        assert r.kv_capacity == r.peak_kv_tokens + 4  # no budget: what every group at its longest holds, + scratch
        one = _run(m, tiny_tokenizer, q, 3, max_new_tokens=T, page_size=1)
        assert one.kv_traffic == r.kv_traffic
        assert one.peak_kv_tokens == p + 3 * (T - 1)  # the prompt held once
        assert torch.equal(one.response_ids, r.response_ids)


def test_forks_share_the_roots_pages(tiny_model, tiny_tokenizer):
    """A tree: branches read their root's pages in place. With one position a page, every page held was written once,
    by the prefill or by one decode step, so the cache held is at most p + decoded positions (a copied prefix would
    exceed it), and less than G separate rows'."""
    V = tiny_model.config.vocab_size
    bias = torch.zeros(V); bias[EOS_ID] = float("-inf")
    m = _MODELS.setdefault((1.0, "no-eos"), _logits_hook(tiny_model, bias=bias))
    q, G, T = _ids(tiny_tokenizer, "12+34="), 8, 16
    p = len(q[0])
    cfg = SamplingConfig(max_new_tokens=T, sampler="tree", tau=0.0, page_size=1)
    r = _run(m, tiny_tokenizer, q, G, seed=5, **vars(cfg))
    _check_leaf_invariants(r, q, G, cfg)
    assert r.forks_made.tolist() == [G - cfg.num_chains] and int(r.branch_pos.sum()) > 0
    assert r.kv_traffic == dict(prefill=p, decode=r.decoded_tokens, swap=0)  # every row in flight computed, no idle one
    assert r.peak_kv_tokens <= p + r.decoded_tokens < p + sum(int(x) - 1 for x in r.response_mask.sum(1))
    cfg.page_size = 4
    assert torch.equal(_run(m, tiny_tokenizer, q, G, seed=5, **vars(cfg)).response_ids, r.response_ids)


def test_page_attention_equals_dense_attention():
    """_attend's decode path against softmax(q k^T) v over each row's positions in order: random pages, two rows sharing
    their first two pages, a short row padded with the scratch page, 4 query heads on 2 KV heads. Each row's new key
    and value land at its position first (and nowhere else) and are attended to."""
    g = torch.Generator().manual_seed(0)
    N, page, Hkv, H, D = 9, 4, 2, 4, 8
    pool = torch.randn(1, 2, page, N + 1, Hkv, D, generator=g)  # [layers, K/V, page, pages, Hkv, D]; page 9: scratch
    tables = [[5, 2, 7], [5, 2, 1], [3, 9, 9]]
    pos = torch.tensor([10, 9, 1])  # each row's new position, the last it attends to
    at = torch.arange(11)
    seen = at <= pos[:, None]  # [3, 11]
    read = torch.where(seen, torch.tensor(tables)[:, at // page], N) + at % page * (N + 1)  # masked: the scratch page
    mask = torch.zeros(seen.shape).masked_fill(~seen, float("-inf"))[:, None, None]
    S = page * (N + 1)  # K's slots, then V's
    write = read.gather(1, pos[:, None])
    view = rollout._View(pool.flatten(0, 3), S, torch.stack([write, write + S]), torch.cat([read.flatten(),
                                                                                             read.flatten() + S]), mask)
    q, k, v = (torch.randn(3, h, 1, D, generator=g) for h in (H, Hkv, Hkv))
    before = pool.clone()
    out, _ = rollout._attend(type("Layer", (), {"layer_idx": 0})(), q, k, v, None, scaling=0.3, page_kv=view)
    assert int((pool != before).any(-1).sum()) == 3 * 2 * Hkv  # one position a row, K and V, every KV head
    for i, pages in enumerate(tables):
        Kr, Vr = (before[0, x][:, pages].transpose(0, 1).flatten(0, 1)[: pos[i] + 1] for x in (0, 1))  # in order
        Kr[pos[i]], Vr[pos[i]] = k[i, :, 0], v[i, :, 0]
        for h in range(H):
            w = torch.softmax(Kr[:, h // 2] @ q[i, h, 0] * 0.3, 0)
            torch.testing.assert_close(out[i, 0, h], w @ Vr[:, h // 2])


def test_cache_is_stored_in_the_compute_dtype(tiny_model, tiny_tokenizer, monkeypatch):
    """fp32 weights under bf16 autocast (train.py's sampling): Qwen3's k_norm returns fp32 keys, the cache holds
    bf16 (half the bytes); the log-probs stay those of the autocast forward."""
    made = _engines(monkeypatch)
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = _run(tiny_model, tiny_tokenizer, prompts, 2, seed=1, max_new_tokens=12)
        fresh = [_fresh_logits(tiny_model, q, resp) for q, resp in _rows(r, prompts, 2)]
    assert made[-1].pool.dtype == torch.bfloat16
    assert r.kv_capacity * rollout.kv_bytes_per_position(tiny_model, torch.bfloat16) == made[-1].pool.numel() * 2
    for b, (logits, (q, resp)) in enumerate(zip(fresh, _rows(r, prompts, 2))):
        want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(resp)[:, None])[:, 0]
        torch.testing.assert_close(r.logprobs[b, : len(resp)], want, atol=0.1, rtol=0)  # bf16 rounding only


def test_model_attention_restored_after_sampling(tiny_model, tiny_tokenizer):
    """sample() switches the model to its paged attention and back, also when sampling fails halfway."""
    ids = torch.tensor([_ids(tiny_tokenizer, "12+34=")[0]])
    before, logits = tiny_model.config._attn_implementation, tiny_model(input_ids=ids).logits
    _run(tiny_model, tiny_tokenizer, [ids[0].tolist()], 2, max_new_tokens=4)
    assert tiny_model.config._attn_implementation == before
    assert torch.equal(tiny_model(input_ids=ids).logits, logits)
    m = copy.deepcopy(tiny_model)
    calls = []

    def fail_on_third(mod, inp, out):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    m.lm_head.register_forward_hook(fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        _run(m, tiny_tokenizer, [ids[0].tolist()], 2, max_new_tokens=8)
    assert m.config._attn_implementation == before


@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens_and_compiles_once(tiny_model, tiny_tokenizer):
    """torch.compile (inductor on CPU) over the decode step: the same tokens, flat and tree. After one rollout of a
    sampler, a rollout with other prompts and a budget that swaps groups out and back in (other row and page counts,
    another pool size) compiles nothing more: what TORCH_LOGS=recompiles would show."""
    prompts = _ids(tiny_tokenizer, *PROMPTS)
    budget = (rollout.group_pages(max(map(len, prompts)), 3, 16, 4) + 3) * 4
    graphs = lambda: len(torch._dynamo.eval_frame._debug_get_cache_entry_list(rollout._decode.__code__))  # noqa: E731
    for cfg in (dict(), dict(sampler="tree", tau=0.0)):
        _run(tiny_model, tiny_tokenizer, prompts[:1], 2, seed=1, max_new_tokens=8, compile=True, **cfg)  # warm-up
        before = graphs()
        comp = _run(tiny_model, tiny_tokenizer, prompts, 3, seed=2, max_new_tokens=16, kv_budget=budget,
                    page_size=4, compile=True, **cfg)
        assert graphs() == before and comp.kv_traffic["swap"] > 0
        eager = _run(tiny_model, tiny_tokenizer, prompts, 3, seed=2, max_new_tokens=16, kv_budget=budget,
                     page_size=4, **cfg)
        assert torch.equal(eager.response_ids, comp.response_ids) and torch.equal(eager.parent, comp.parent)
        torch.testing.assert_close(eager.logprobs, comp.logprobs, atol=1e-5, rtol=0)
        assert comp.decode_steps == eager.decode_steps


# ----------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, before the model runs


@pytest.mark.parametrize("G,cfg,match", [
    (0, {}, "group_size"),
    (2.0, {}, "group_size"),
    (2, dict(max_new_tokens=0), "max_new_tokens"),
    (2, dict(temperature=-0.1), "temperature"),
    (2, dict(temperature=float("nan")), "temperature"),
    (2, dict(top_p=0.0), "top_p"),
    (2, dict(top_p=1.5), "top_p"),
    (2, dict(top_k=-1), "top_k"),
    (2, dict(sampler="beam"), "sampler"),
    (2, dict(sampler="tree", tau=-1.0), "tau"),
    (2, dict(sampler="tree", tau=float("nan")), "tau"),
    (2, dict(sampler="tree", num_chains=3), "num_chains"),
    (2, dict(sampler="tree", num_chains=0), "num_chains"),
    (2, dict(sampler="tree", max_children=1), "max_children"),
    (2, dict(sampler="tree", max_forks=-1), "max_forks"),
    (2, dict(sampler="tree", temperature=0.0), "temperature"),
    (2, dict(max_new_tokens=10, kv_budget=39, page_size=4),
     r"kv_budget=39: .*prompt \(3\) \+ 2 rows x max_new_tokens \(10\), in pages of 4 .* = 40 positions"),
    (2, dict(page_size=0), "page_size"),
    (2, dict(page_size=4.0), "page_size"),
    (2, dict(kv_budget=0), "kv_budget"),
    (2, dict(kv_budget=1000.0), "kv_budget"),
    (2, dict(compile="yes"), "compile"),
])
def test_bad_config_raises_before_decoding(tiny_model, G, cfg, match):
    """check_config is the boundary (train.py calls it on its flags): one ValueError naming the field."""
    h = tiny_model.register_forward_pre_hook(lambda *a: pytest.fail("the model ran before the config was checked"))
    try:
        with pytest.raises(ValueError, match=match):
            sample(tiny_model, [[5, 6, 7], [5]], G, SamplingConfig(**cfg), eos_token_ids=EOS_ID, pad_token_id=0)
    finally:
        h.remove()


@pytest.mark.parametrize("prompts,kwargs", [
    ([], {}), ([[5, 6], []], {}), ([[5, 1000]], {}), ([[5] * 40_959], {}),
    ([[5]], dict(eos_token_ids=[])), ([[5]], dict(pad_token_id=-1)), ([[5], [6]], dict(prompt_keys=[0])),
])
def test_bad_arguments_fail_an_assert(tiny_model, prompts, kwargs):
    """Inside, callers are trusted: sample()'s own arguments are asserted (empty prompts, ids outside the vocab, a
    prompt past the context, no EOS, one key per prompt)."""
    kwargs = dict(dict(eos_token_ids=EOS_ID, pad_token_id=0), **kwargs)
    with pytest.raises(AssertionError):
        sample(tiny_model, prompts, 2, SamplingConfig(max_new_tokens=2), **kwargs)


def test_bench_rollout_paged_steps_bound_by_hand():
    """The paper case's 'paged cache' line: prompts of 4 and 2 tokens, G = 2, response lengths 3, 1, 2, 2.
    Positions held over the steps: responses 6 + 1 + 3 + 3 = 13; prompts per row 4*3 + 4*1 + 2*2 + 2*2 = 24, or
    shared by their rows for their longest row 4*3 + 2*2 = 16. A budget of 10: ceil(37 / 10) = 4 and
    ceil(29 / 10) = 3 steps; a budget of 100: the longest row, 3."""
    from benchmarks import bench_rollout
    assert bench_rollout.paged_steps_bound([4, 2], 2, [3, 1, 2, 2], 10, shared=False) == 4
    assert bench_rollout.paged_steps_bound([4, 2], 2, [3, 1, 2, 2], 10, shared=True) == 3
    assert bench_rollout.paged_steps_bound([4, 2], 2, [3, 1, 2, 2], 100, shared=False) == 3


def test_bench_rollout_tree_section_runs(capsys):
    """The tree section end to end on a random tiny model (a crash here is a benchmark nobody can rerun): both
    tables print, and at every equal budget both samplers stay within it."""
    from benchmarks import bench_rollout
    bench_rollout.main(bench_rollout.parse_args("--sections tree --models 64x2 --P 2 --G 3 --max-new-tokens 8 "
                                                "--repeats 1 --taus 1.0".split()))
    out = capsys.readouterr().out
    assert "tree tau=0.5 (default)" in out and "tree tau=1 " in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[-5:-1]}
    assert set(rows) == {"kv_budget", "none", "half", "floor"}
    for name in ("half", "floor"):
        budget, peaks = int(rows[name][1].replace(",", "")), rows[name][-2:]
        assert all(int(p.replace(",", "")) <= budget for p in peaks)
