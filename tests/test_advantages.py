"""advantages.py (fast) against trie.py (readable), by hand, and by identities the SPEC implies.

Layers: README's worked example by hand; fast == trie on random batches (hypothesis; small vocabularies
so that branches are everywhere; G = 1, equal rewards, identical, empty and strict-prefix rows, padding
that holds real ids); the doubling windows of pairwise_lcp; identities (td_weight 0 is GRPO, the branch
gate, telescoping, TreeAdv's sum rule); HEPO by hand and against a sort. Tolerance 1e-5.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advantages as adv
import trie
import trie_batch

TOL = dict(atol=1e-5, rtol=1e-5)
EX = torch.tensor([[0, 2, 4, 4], [0, 2, 4, 4], [0, 3, 4, 4], [1, 4, 4, 4]])  # Ax.., Ax.., Ay.., B...
EX_MASK, EX_R = torch.ones(4, 4, dtype=torch.bool), torch.tensor([1.0, 1.0, 0.0, 0.0])
S = math.sqrt(1 / 3)  # the example's sigma; mu = 0.5


def rows_of(responses, mask):
    return [row[:n] for row, n in zip(responses.tolist(), mask.sum(1).tolist())]


def lcp(o1, o2):
    n = 0
    while n < min(len(o1), len(o2)) and o1[n] == o2[n]:
        n += 1
    return n


@st.composite
def batches(draw, max_P=3, max_G=5, max_T=8):
    """responses [B, T], mask [B, T], rewards [B], G: rows copy prefixes of earlier rows of their group."""
    P, G, T = draw(st.integers(1, max_P)), draw(st.integers(1, max_G)), draw(st.integers(0, max_T))
    V = draw(st.integers(1, 3))  # a small vocabulary: branches everywhere
    rows = []
    for i in range(P * G):
        n = draw(st.integers(0, T))
        own = draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n))
        g0 = i - i % G
        if i > g0 and draw(st.booleans()):  # share a prefix with (or copy) an earlier row
            parent = rows[draw(st.integers(g0, i - 1))]
            k = draw(st.integers(0, len(parent)))
            own = (parent[:k] + own)[:max(n, k)]
        rows.append(own)
    pad = draw(st.lists(st.integers(0, V), min_size=P * G * T, max_size=P * G * T))  # real ids in padding
    responses = torch.tensor(pad, dtype=torch.long).view(P * G, T)
    mask = torch.zeros(P * G, T, dtype=torch.bool)
    for i, row in enumerate(rows):
        responses[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = True
    kind = draw(st.sampled_from(["binary", "equal", "float"]))
    if kind == "binary":
        r = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=P * G, max_size=P * G))
    elif kind == "equal":
        r = [draw(st.floats(-3, 3, width=32))] * (P * G)
    else:
        r = draw(st.lists(st.floats(-10, 10, width=32), min_size=P * G, max_size=P * G))
    return responses, mask, torch.tensor(r, dtype=torch.float32), G


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- README's worked example, by hand


def test_worked_example_by_hand():
    """A misread formula (TEMPO's delta, TreeAdv's node, the counts, a diagnostic) shows here first."""
    A = adv.tempo_advantages(EX, EX_MASK, EX_R, 4, eps=0.0)
    torch.testing.assert_close(A, torch.tensor([[1.155, 1.443, 0.866, 0.866], [1.155, 1.443, 0.866, 0.866],
                                                [-0.577, -2.021, -0.866, -0.866], [-1.732, -0.866, -0.866, -0.866]]),
                               atol=1e-3, rtol=0)  # README's three decimals
    exact = torch.tensor([[0.5 + 1 / 6, 0.5 + 1 / 3, 0.5, 0.5], [0.5 + 1 / 6, 0.5 + 1 / 3, 0.5, 0.5],
                          [-0.5 + 1 / 6, -0.5 - 2 / 3, -0.5, -0.5], [-1.0, -0.5, -0.5, -0.5]]) / S
    torch.testing.assert_close(A, exact, **TOL)  # ((r - mu) + V(s_{t+1}) - V(s_t)) / sigma
    torch.testing.assert_close(adv.grpo_advantages(EX_R, 4, eps=0.0), torch.tensor([0.5, 0.5, -0.5, -0.5]) / S)
    assert adv.prefix_counts(EX, EX_MASK, 4).tolist() == [[3, 2, 2, 2], [3, 2, 2, 2], [3, 1, 1, 1], [1, 1, 1, 1]]
    torch.testing.assert_close(adv.treeadv_advantages(EX, EX_MASK, EX_R, 4, eps=0.0)[:, :2],
                               torch.tensor([[1 / 6, 0.5], [1 / 6, 0.5], [1 / 6, -0.5], [-0.5, -0.5]]) / S)
    d = adv.branch_diagnostics(EX, EX_MASK, EX_R, 4)
    assert d["branch_token_frac"] == 7 / 16  # 4 tokens leave the root, 3 leave node A
    assert d["first_divergence_depth"] == 0.0 and d["unique_depth"] == (4 + 4 + 1 + 0) / 4
    # sum |delta| over the 7 branch tokens 3 (1/6) + 1/2 + 2 (1/3) + 2/3 = 7/3, sum |A| sigma = 4 x 2.5
    assert d["td_share"] == pytest.approx(7 / 30, rel=1e-5)


# ---- fast == trie on random batches


@FAST
@given(batches(), st.sampled_from(["group", "batch", "none"]), st.sampled_from([1.0, 0.0, -2.0]), st.booleans())
def test_tempo_fast_equals_trie(batch, scale, td_weight, scale_td):
    """Catches a wrong branch event (ties, strict prefixes, empty rows, padding ids), scale or TD form."""
    responses, mask, rewards, G = batch
    kw = dict(td_weight=td_weight, scale=scale, scale_td=scale_td)
    fast = adv.tempo_advantages(responses, mask, rewards, G, **kw)
    assert fast.dtype == torch.float32 and (fast[~mask] == 0).all()
    torch.testing.assert_close(fast, trie_batch.tempo_batch(responses, mask, rewards, G, **kw), **TOL)
    tree = adv.prefix_tree(responses, mask, G)  # a tree built once and passed in changes nothing
    assert torch.equal(fast, adv.tempo_advantages(responses, mask, rewards, G, **kw, tree=tree))


@FAST
@given(batches(), st.sampled_from(["group", "batch", "none"]))
def test_treeadv_and_counts_fast_equal_trie(batch, scale):
    """Catches an off-by-one between s_t and s_{t+1} (TreeAdv credits the node a token enters), and a
    tree slice that does not fit the rows it is used with (train.py's unique segments on one rank)."""
    responses, mask, rewards, G = batch
    tree = adv.prefix_tree(responses, mask, G)
    fast = adv.treeadv_advantages(responses, mask, rewards, G, scale=scale, tree=tree)
    torch.testing.assert_close(fast, trie_batch.treeadv_batch(responses, mask, rewards, G, scale=scale), **TOL)
    counts = adv.prefix_counts(responses, mask, G, tree=tree)
    assert torch.equal(counts, trie_batch.prefix_counts_batch(responses, mask, G))
    lo = G * (responses.shape[0] // G // 2)  # this rank's whole groups, its own narrower T
    T_mine = int(mask[lo:].sum(1).max())
    mine = adv.prefix_counts(responses[lo:, :T_mine], mask[lo:, :T_mine], G, tree=tree.rows(slice(lo, None)))
    assert torch.equal(mine, counts[lo:, :T_mine])


@FAST
@given(batches())
def test_diagnostics_fast_equal_trie(batch):
    """Catches a branch token counted twice (lcp ties) or a depth taken from the row's own lcp."""
    responses, mask, rewards, G = batch
    fast = adv.branch_diagnostics(responses, mask, rewards, G)
    for key, want in trie_batch.diagnostics_batch(responses, mask, rewards, G).items():
        assert math.isnan(fast[key]) if math.isnan(want) else fast[key] == pytest.approx(want, rel=1e-5, abs=1e-5)


@settings(max_examples=150, deadline=None)
@given(batches(max_G=6, max_T=12), st.integers(1, 3))
def test_pairwise_lcp_across_window_edges(batch, window):
    """Windows of 1-3 tokens make the doubling loop cross many edges: a pair that diverges right after an
    edge, or a pair dropped one window early, shows here. The tree is each row's lcp values sorted."""
    responses, mask, _, G = batch
    rows = rows_of(responses, mask)
    want = [[lcp(rows[i], rows[i - i % G + k]) for k in range(G)] for i in range(len(rows))]
    got = adv.pairwise_lcp(responses, mask, G, window=window)
    assert got.tolist() == want
    tree = adv.prefix_tree(responses, mask, G)
    assert tree.lcp_sorted.tolist() == [sorted(row) for row in want]
    assert torch.equal(got.gather(1, tree.order), tree.lcp_sorted)


def test_long_shared_prefixes_and_sampled_like_batches_equal_trie():
    """Shared prefixes of 63..65, 191..193, 447..449 tokens sit on the default windows' edges; then the
    benchmark's batches (long rows, few shared tokens), smaller."""
    from benchmarks.bench_advantages import sampled_like_batch

    gen = torch.Generator().manual_seed(0)
    T, G = 520, 4
    responses = torch.randint(0, 50, (6 * G, T), generator=gen)
    lengths = torch.randint(T // 2, T + 1, (6 * G,), generator=gen)
    for i, share in enumerate([63, 64, 65, 191, 192, 193, 447, 448, 449, 519, 520, 0] * 2):
        if i % G:
            responses[i, :share] = responses[i - 1, :share]
            lengths[i] = max(lengths[i], min(share, int(lengths[i - 1])))
    batches = [(responses, torch.arange(T)[None, :] < lengths[:, None],
                torch.randint(0, 2, (6 * G,), generator=gen).float(), G)]
    batches += [(*sampled_like_batch(4 * G, G, 300, 20, seed=G), G) for G in (1, 3, 8)]
    for responses, mask, rewards, G in batches:
        torch.testing.assert_close(adv.tempo_advantages(responses, mask, rewards, G),
                                   trie_batch.tempo_batch(responses, mask, rewards, G), **TOL)
        torch.testing.assert_close(adv.treeadv_advantages(responses, mask, rewards, G),
                                   trie_batch.treeadv_batch(responses, mask, rewards, G), **TOL)
        assert torch.equal(adv.prefix_counts(responses, mask, G), trie_batch.prefix_counts_batch(responses, mask, G))


# ---- TreeRL, TreePO, SPO and the centred TreeAdv: by hand on the worked example, then fast == trie


def test_tree_estimators_on_the_worked_example_by_hand():
    """Each estimator's formula written out on README's example (see trie.py's picture): a misread formula,
    a segment hung from the wrong node or a whitening over the wrong tokens shows here."""
    def rows(a, b, c, d):  # per-token values of the segments 'A', 'x..', 'y..', 'B...'
        return torch.tensor([[a, b, b, b], [a, b, b, b], [a, c, c, c], [d, d, d, d]])
    # TreeRL: c = N/(N-1) (V - mu) / sqrt(n); 2 c(s) - c(parent), c(root) = 0
    cA, cx, cy, cB = 4 / 3 * (1 / 6) / math.sqrt(3), 4 / 3 * 0.5 / math.sqrt(2), 4 / 3 * -0.5, 4 / 3 * -0.5
    torch.testing.assert_close(adv.treerl_advantages(EX, EX_MASK, EX_R, 4),
                               rows(2 * cA, 2 * cx - cA, 2 * cy - cA, 2 * cB), **TOL)
    # SPO: W(Ax..) = 1, W(Ay..) = W(B...) = 0, W(A) = 0.5, W(root) = (0.5 + 0) / 2; W(s) - W(parent)
    torch.testing.assert_close(adv.spo_advantages(EX, EX_MASK, EX_R, 4), rows(0.25, 0.5, -0.5, -0.25), **TOL)
    # TreePO: x = mean over X of (r - mean_X): rows 1-2 over {all, A, Ax..}, row 3 over {all, A}, row 4 {all}
    x = [(0.5 + 1 / 3 + 0) / 3, (-0.5 - 2 / 3) / 2, -0.5]
    tok = [x[0]] * 8 + [x[1]] * 4 + [x[2]] * 4  # 16 tokens, whitened: Bessel's var, eps 1e-8
    m = sum(tok) / 16
    sd = math.sqrt(sum((v - m) ** 2 for v in tok) / 15 + 1e-8)
    want = torch.tensor([(v - m) / sd for v in (x[0], x[0], x[1], x[2])])[:, None].expand(4, 4)  # per response
    torch.testing.assert_close(adv.treepo_advantages(EX, EX_MASK, EX_R, 4), want, **TOL)
    # centred TreeAdv: Ahat over the 11 token nodes A, Ax, Ax., Ax.., Ay, Ay., Ay.., B, B., B.., B... is
    # [1/6, 1/2 x 3, -1/2 x 7] / sigma, so m = -1/6 / sigma and s = sqrt(2/3) / sigma (Bessel, 10)
    torch.testing.assert_close(adv.treeadv_advantages(EX, EX_MASK, EX_R, 4, centred=True),
                               rows(1, 2, -1, -1) / math.sqrt(2), **TOL)


def test_treerl_fill_takes_the_previous_segments_local_value():
    """TreeRL's fill_in_paths: 'abcd' goes a (V 0.6) -> b (V 0.5 = mu) -> c (V 0.5) -> d; at 'c' the local
    value c(c) - c(b) = 0, so it takes b's, c(b) - c(a) = -c(a). Without the fill 'c' would get 0."""
    a, b, c, d, e, f, g, h, x, z = range(10)
    responses = torch.tensor([[a, b, c, d], [a, b, c, e], [a, b, f, g], [a, b, f, h], [a, g, x, x], [z, z, z, z]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])  # mu = 0.5
    cA = 6 / 5 * (0.6 - 0.5) / math.sqrt(5)
    A = adv.treerl_advantages(responses, torch.ones(6, 4, dtype=torch.bool), rewards, 6)
    torch.testing.assert_close(A[0], torch.tensor([2 * cA, -cA, -cA, 2 * 6 / 5 * 0.5]), **TOL)
    torch.testing.assert_close(A, trie_batch.treerl_batch(responses, torch.ones(6, 4, dtype=torch.bool), rewards, 6))


@FAST
@given(batches())
def test_tree_estimators_fast_equal_trie(batch):
    """Catches a segment hung from the wrong node (lcp ties, strict prefixes, empty and identical rows),
    SPO's children miscounted (each response that ends at a node is its own child), a TreePO set counted
    twice, and a centring over tokens instead of the trie's nodes."""
    responses, mask, rewards, G = batch
    tree = adv.prefix_tree(responses, mask, G)
    pairs = [(adv.treerl_advantages, trie_batch.treerl_batch), (adv.treepo_advantages, trie_batch.treepo_batch),
             (adv.spo_advantages, trie_batch.spo_batch),
             (lambda *a, **k: adv.treeadv_advantages(*a, centred=True, **k),
              lambda *a: trie_batch.treeadv_batch(*a, centred=True))]
    for fast, slow in pairs:
        got = fast(responses, mask, rewards, G, tree=tree)
        assert got.dtype == torch.float32 and (got[~mask] == 0).all()
        torch.testing.assert_close(got, slow(responses, mask, rewards, G), **TOL)


# ---- edge cases, by hand


def test_edge_cases_by_hand():
    """Identical rows, a strict prefix whose padding equals its sibling's next token, an empty row, and
    equal rewards (exactly 0, also when their float mean is not their value)."""
    responses = torch.tensor([[1, 2, 3, 0, 0], [1, 2, 3, 0, 0], [1, 2, 3, 3, 3], [1, 2, 3, 0, 0],
                              [2, 2, 2, 2, 2], [2, 1, 0, 0, 0], [4, 5, 0, 0, 0], [4, 6, 0, 0, 0]])
    mask = torch.arange(5)[None, :] < torch.tensor([3, 3, 2, 3, 0, 2, 2, 2])[:, None]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.3, 0.3])
    s = math.sqrt(0.5) + 1e-6
    A = adv.tempo_advantages(responses, mask, rewards, 2)
    torch.testing.assert_close(A[0, :3], torch.full((3,), 0.5 / s))  # identical rows: D never splits, GRPO
    torch.testing.assert_close(A[2, :2], torch.full((2,), -0.5 / s))  # "a b" keeps A_i ...
    torch.testing.assert_close(A[3, :3], torch.tensor([0.5, 0.5, 1.0]) / s)  # ... "a b c" gets delta 1 - 0.5
    assert (A[4] == 0).all()  # an empty row; its sibling's first token leaves the root: delta = 0 - 0.5
    torch.testing.assert_close(A[5, :2], torch.tensor([-1.0, -0.5]) / s)
    assert (A[6:] == 0).all() and (adv.treeadv_advantages(responses, mask, rewards, 2)[6:] == 0).all()
    tenth = torch.full((6,), 0.1, dtype=torch.float64)  # 0.1 + 0.1 + 0.1 != 0.3: mu != r in floats
    three, ones = torch.tensor([[1, 2], [1, 3], [1, 2], [4, 4], [4, 5], [6, 6]]), torch.ones(6, 2, dtype=torch.bool)
    for fn in (adv.tempo_advantages, adv.treeadv_advantages, adv.treerl_advantages, adv.treepo_advantages,
               adv.spo_advantages, lambda *a: adv.treeadv_advantages(*a, centred=True)):
        assert (fn(three, ones, tenth, 3) == 0).all()
    assert (adv.grpo_advantages(tenth, 3) == 0).all()
    assert (adv.hepo_advantages(torch.rand(6, 2), ones, tenth, 3, rho=1.0) == 0).all()
    assert (adv.tempo_advantages(responses, mask, torch.full((8,), 0.7), 2, scale="batch") == 0).all()


def test_group_of_one_and_empty_shapes():
    """A group of one has mu = 0, sigma = 1 under every scale (not nan); T = 0 keeps its shape."""
    responses, mask = torch.tensor([[3, 4, 5], [3, 4, 9]]), torch.tensor([[True, True, False], [True, True, True]])
    rewards = torch.tensor([1.0, -2.0])
    for scale, denom in (("group", 1 + 1e-6), ("batch", 1 + 1e-6), ("none", 1.0)):
        expect = (rewards / denom)[:, None] * mask
        torch.testing.assert_close(adv.tempo_advantages(responses, mask, rewards, 1, scale=scale), expect)
        torch.testing.assert_close(adv.treeadv_advantages(responses, mask, rewards, 1, scale=scale), expect)
    d = adv.branch_diagnostics(responses, mask, rewards, 1)
    assert d["branch_token_frac"] == 0.0 and math.isnan(d["first_divergence_depth"]) and math.isnan(d["unique_depth"])
    empty = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool)
    assert adv.tempo_advantages(*empty, rewards, 2).shape == adv.treeadv_advantages(*empty, rewards, 2).shape == (2, 0)
    assert adv.branch_diagnostics(*empty, rewards, 2)["branch_token_frac"] == 0.0


# ---- identities


@FAST
@given(batches())
def test_identities(batch):
    """td_weight 0 is GRPO bit for bit; delta is 0 off branch nodes (n(s_{t+1}) < n(s_t)); the TD steps
    telescope to V(s_L) - mu; TreeAdv summed over the rows sharing a node is their GRPO sum (SPEC 5a)."""
    responses, mask, rewards, G = batch
    B = responses.shape[0]
    grpo = adv.grpo_advantages(rewards, G)
    assert torch.equal(adv.tempo_advantages(responses, mask, rewards, G, td_weight=0.0),
                       torch.where(mask, grpo[:, None], 0.0))
    delta = (adv.tempo_advantages(responses, mask, rewards, G, scale="none").double()
             - adv.tempo_advantages(responses, mask, rewards, G, scale="none", td_weight=0.0).double())
    n_next = adv.prefix_counts(responses, mask, G)
    n_now = torch.cat([torch.full((B, 1), G), n_next[:, :-1]], 1)
    assert (delta[~((n_next < n_now) & mask)] == 0).all()
    rows, r = rows_of(responses, mask), rewards.double()
    tree = adv.treeadv_advantages(responses, mask, rewards, G)
    for i, o in enumerate(rows):
        g0 = i - i % G
        group = list(range(g0, g0 + G))
        if G >= 2 and not trie.all_equal(rewards[g0:g0 + G].tolist()):
            last = [j for j in group if lcp(o, rows[j]) >= len(o)]  # D(s_L)
            assert float(delta[i].sum()) == pytest.approx(float(r[last].mean() - r[group].mean()), abs=1e-5)
        for t in range(len(o)):
            sharing = [j for j in group if lcp(o, rows[j]) >= t + 1]
            want = float(grpo[sharing].double().sum())
            assert float(tree[sharing, t].double().sum()) == pytest.approx(want, abs=1e-4)


# ---- HEPO


def ref_hepo(entropy, mask, rewards, G, rho):
    """SPEC 4 read literally: GRPO's A_i on the floor(rho * #valid) highest-entropy valid tokens, earlier first."""
    r = rewards.tolist()
    A = []
    for g in range(0, len(r), G):
        mu, sigma = trie.group_baseline(r[g:g + G])
        A += [0.0 if trie.all_equal(r[g:g + G]) else (x - mu) / (sigma + 1e-6) for x in r[g:g + G]]
    valid = sorted((-h, i, t) for i, (hs, ms) in enumerate(zip(entropy.tolist(), mask.tolist()))
                   for t, (h, m) in enumerate(zip(hs, ms)) if m)
    out = torch.zeros(entropy.shape)
    for _, i, t in valid[:math.floor(rho * len(valid))]:
        out[i, t] = A[i]
    return out


def test_hepo_by_hand():
    """10 valid tokens, rho = 0.3: k = 3 -> 0.9, then the two 0.5s (the tie goes to the earlier); the 7.0
    in padding never counts."""
    entropy = torch.tensor([[0.1, 0.5, 0.2, 7.0], [0.9, 0.3, 0.5, 0.5], [0.0, 0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0, 0.0])  # mu = 1/3, sigma = sqrt(1/3)
    s = math.sqrt(1 / 3) + 1e-6
    expect = torch.zeros(3, 4)
    expect[0, 1], expect[1, 0], expect[1, 2] = (2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s
    torch.testing.assert_close(adv.hepo_advantages(entropy, mask, rewards, 3, rho=0.3), expect, **TOL)
    assert (adv.hepo_advantages(entropy, mask, rewards, 3, rho=0.0) == 0).all()


@FAST
@given(batches(), st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.data())
def test_hepo_against_a_sort(batch, rho, data):
    """Catches padding ranked among the top k (their HEPO's bug, SPEC 10) and unstable ties."""
    responses, mask, rewards, G = batch
    B, T = responses.shape
    H = data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, float("nan")]), min_size=B * T, max_size=B * T))
    entropy = torch.tensor(H, dtype=torch.float32).view(B, T)
    entropy = torch.where(mask, entropy.nan_to_num(0.75), entropy)  # nan only in padding
    torch.testing.assert_close(adv.hepo_advantages(entropy, mask, rewards, G, rho=rho),
                               ref_hepo(entropy, mask, rewards, G, rho), **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    from benchmarks.bench_advantages import sampled_like_batch

    responses, mask, rewards = sampled_like_batch(64, 8, 300, 20, seed=3)
    cuda = [x.cuda() for x in (responses, mask, rewards)]
    for fn in (adv.tempo_advantages, adv.treeadv_advantages):
        out = fn(*cuda, 8)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), fn(responses, mask, rewards, 8), **TOL)
    assert torch.equal(adv.prefix_counts(cuda[0], cuda[1], 8).cpu(), adv.prefix_counts(responses, mask, 8))


# ---- each tree estimator trains end to end (train.py --method)


@pytest.mark.slow
@pytest.mark.parametrize("method, fn", [("treerl", "treerl_advantages"), ("treepo", "treepo_advantages"),
                                        ("spo", "spo_advantages"), ("treeadv-centred", "treeadv_advantages")])
def test_each_tree_estimator_trains_end_to_end(method, fn, tiny_model_dir, tmp_path, monkeypatch):
    """Catches a --method that train.py does not route to its estimator (or routes without centred=True),
    and an estimator that breaks a step on real tree-sampled groups: one step, a finite loss, one call."""
    import train

    calls, real = [], getattr(adv, fn)

    def spy(*a, **k):
        calls.append(k.get("centred", False))
        return real(*a, **k)
    monkeypatch.setattr(train.advantages, fn, spy)
    train.train(train.parse_args([
        "--method", method, "--sampler", "tree", "--model", tiny_model_dir, "--task", "add", "--steps", "1",
        "--group-size", "4", "--prompts-per-step", "2", "--mini-batch-prompts", "2", "--micro-batch-rows", "8",
        "--max-new-tokens", "5", "--lr", "3e-4", "--val-every", "0", "--sample-every", "0", "--save-every", "0",
        "--device", "cpu", "--no-progress", "--out", str(tmp_path)]))
    rows = [r for r in train.read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["loss"])
    assert calls == [method == "treeadv-centred"]
