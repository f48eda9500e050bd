"""advantages.py against trie.py and against an independent reading of SPEC 1-5, plus identities.

Layers: SPEC 3's worked example by hand; a third implementation (`ref_*` below: plain loops over
rows and tokens, prefix sets found by slicing, written from README's SPEC section only, not calling trie.py);
fast vs trie vs reference on random batches (hypothesis, small vocabularies so that branches are
frequent; G = 1, equal rewards, identical, empty and strict-prefix responses, padding ids that are
real ids); identities (telescoping, branch gate, td_weight = 0, TreeAdv's sum rule); HEPO by hand;
bad inputs. Tolerance 1e-5.
"""
import math
import statistics

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advantages as adv
import trie
import trie_batch

TOL = dict(atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# An independent implementation of SPEC 1-5: loops, slices, the statistics module


def ref_rows(responses, mask):
    """Each row's real tokens: the ids where the mask is True (the mask is a prefix mask)."""
    rows = []
    for ids, m in zip(responses.tolist(), mask.tolist()):
        n = sum(m)
        assert m == [True] * n + [False] * (len(m) - n)
        rows.append(ids[:n])
    return rows


def ref_baseline(group_r, all_r, eps, scale):
    """SPEC 1: (mu, sigma + eps); a group of one has mu 0, sigma 1; 'none' divides by 1."""
    if len(group_r) == 1:
        mu, sigma = 0.0, 1.0
    else:
        mu = statistics.fmean(group_r)
        sigma = statistics.stdev(all_r if scale == "batch" else group_r)
    return mu, (1.0 if scale == "none" else sigma + eps)


def ref_equal(group_r):
    return len(group_r) >= 2 and len(set(group_r)) == 1


def ref_D(group, i, t):
    """D(s_t), s_t = the first t tokens of response i: the responses of which s_t is a prefix."""
    return [j for j, o in enumerate(group) if len(o) >= t and o[:t] == group[i][:t]]


def ref_V(group, rewards, i, t):
    return statistics.fmean(rewards[j] for j in ref_D(group, i, t))


def ref_children(group, i, t):
    """The children of s_t: next tokens of its responses, 'END' for one that stops there."""
    return {group[j][t] if len(group[j]) > t else "END" for j in ref_D(group, i, t)}


def ref_lcp(o1, o2):
    n = 0
    while n < min(len(o1), len(o2)) and o1[n] == o2[n]:
        n += 1
    return n


def reference(responses, mask, rewards, G, eps=1e-6, scale="group", td_weight=1.0, scale_td=True):
    """GRPO [B], TEMPO / TreeAdv / prefix counts per row, and the SPEC 8 diagnostics."""
    rows = ref_rows(responses, mask)
    all_r = [float(x) for x in rewards.tolist()]
    out = dict(grpo=[], tempo=[], treeadv=[], counts=[], branch=[], first=[], unique=[])
    for g in range(0, len(rows), G):
        group, r = rows[g:g + G], all_r[g:g + G]
        mu, denom = ref_baseline(r, all_r, eps, scale)
        zero = ref_equal(r)
        for i, o in enumerate(group):
            A_i = 0.0 if zero else (r[i] - mu) / denom
            out["grpo"].append(A_i)
            tempo, tree, counts, branch = [], [], [], []
            for t in range(len(o)):
                delta = ref_V(group, r, i, t + 1) - ref_V(group, r, i, t)
                if zero:
                    tempo.append(0.0)
                    tree.append(0.0)
                elif scale_td:
                    tempo.append(((r[i] - mu) + td_weight * delta) / denom)
                    tree.append((ref_V(group, r, i, t + 1) - mu) / denom)
                else:
                    tempo.append((r[i] - mu) / denom + td_weight * delta)
                    tree.append((ref_V(group, r, i, t + 1) - mu) / denom)
                counts.append(len(ref_D(group, i, t + 1)))
                branch.append(len(ref_children(group, i, t)) >= 2)
            out["tempo"].append(tempo)
            out["treeadv"].append(tree)
            out["counts"].append(counts)
            out["branch"].append(branch)
            others = [ref_lcp(o, group[j]) for j in range(len(group)) if j != i]
            if others:
                out["first"].append(min(others))
                out["unique"].append(max(others))
    return out


def ref_diagnostics(responses, mask, rewards, G, eps=1e-6):
    ref = reference(responses, mask, rewards, G, eps)
    grpo = reference(responses, mask, rewards, G, eps, td_weight=0.0)["tempo"]
    n_tok = sum(len(row) for row in ref["tempo"])
    tempo_abs = sum(abs(a) for row in ref["tempo"] for a in row)
    td_abs = sum(abs(a - b) for ra, rb in zip(ref["tempo"], grpo) for a, b in zip(ra, rb))
    return dict(
        branch_token_frac=sum(map(sum, ref["branch"])) / n_tok if n_tok else 0.0,
        first_divergence_depth=statistics.fmean(ref["first"]) if ref["first"] else math.nan,
        unique_depth=statistics.fmean(ref["unique"]) if ref["unique"] else math.nan,
        td_share=td_abs / tempo_abs if tempo_abs > 0 else 0.0,
    )


def ref_hepo(entropy, mask, rewards, G, rho=0.2, eps=1e-6, scale="group"):
    """SPEC 4: GRPO advantage on the floor(rho * #valid) highest-entropy valid tokens (ties: earlier first)."""
    grpo = reference(torch.zeros_like(mask, dtype=torch.long), mask, rewards, G, eps, scale)["grpo"]
    valid = [(-h, i, t) for i, (hs, ms) in enumerate(zip(entropy.tolist(), mask.tolist()))
             for t, (h, m) in enumerate(zip(hs, ms)) if m]
    k = math.floor(rho * len(valid))
    out = torch.zeros(entropy.shape, dtype=torch.float64)
    for _, i, t in sorted(valid)[:k]:
        out[i, t] = grpo[i]
    return out.float()


def padded(per_row, T, dtype=torch.float64):
    out = torch.zeros(len(per_row), T, dtype=dtype)
    for i, row in enumerate(per_row):
        out[i, :len(row)] = torch.tensor(row, dtype=dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Random batches shaped like sampled groups


@st.composite
def batches(draw, max_P=3, max_G=5, max_T=8):
    """responses [B, T], mask [B, T], rewards [B], G: rows copy prefixes of earlier rows of their group."""
    P = draw(st.integers(1, max_P))
    G = draw(st.integers(1, max_G))
    T = draw(st.integers(0, max_T))
    V = draw(st.integers(1, 3))  # small vocabulary: branches everywhere
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
    # padding holds real ids on purpose
    pad = draw(st.lists(st.integers(0, V), min_size=P * G * T, max_size=P * G * T))
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


# ----------------------------------------------------------------------------------------------
# SPEC 3's worked example, by hand


def test_worked_example_by_hand():
    responses = torch.tensor([[0, 2, 4, 4], [0, 2, 4, 4], [0, 3, 4, 4], [1, 4, 4, 4]])
    mask = torch.ones(4, 4, dtype=torch.bool)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = torch.tensor([[1.155, 1.443, 0.866, 0.866], [1.155, 1.443, 0.866, 0.866],
                             [-0.577, -2.021, -0.866, -0.866], [-1.732, -0.866, -0.866, -0.866]])
    A = adv.tempo_advantages(responses, mask, rewards, 4, eps=0.0)
    torch.testing.assert_close(A, expected, atol=1e-3, rtol=0)  # SPEC's three decimals
    s = math.sqrt(1 / 3)  # exact: ((r - mu) + V(s_{t+1}) - V(s_t)) / sigma
    exact = torch.tensor([[(0.5 + 1 / 6) / s, (0.5 + 1 / 3) / s, 0.5 / s, 0.5 / s],
                          [(0.5 + 1 / 6) / s, (0.5 + 1 / 3) / s, 0.5 / s, 0.5 / s],
                          [(-0.5 + 1 / 6) / s, (-0.5 - 2 / 3) / s, -0.5 / s, -0.5 / s],
                          [-1.0 / s, -0.5 / s, -0.5 / s, -0.5 / s]])
    torch.testing.assert_close(A, exact, **TOL)
    torch.testing.assert_close(adv.grpo_advantages(rewards, 4, eps=0.0),
                               torch.tensor([0.5 / s, 0.5 / s, -0.5 / s, -0.5 / s]), **TOL)
    assert adv.prefix_counts(responses, mask, 4).tolist() == [[3, 2, 2, 2], [3, 2, 2, 2],
                                                              [3, 1, 1, 1], [1, 1, 1, 1]]
    torch.testing.assert_close(adv.treeadv_advantages(responses, mask, rewards, 4, eps=0.0)[:, 0],
                               torch.tensor([1 / 6 / s] * 3 + [-0.5 / s]), **TOL)
    d = adv.branch_diagnostics(responses, mask, rewards, 4)
    assert d["branch_token_frac"] == 7 / 16  # 4 tokens leave the root, 3 leave node A
    assert d["first_divergence_depth"] == 0.0 and d["unique_depth"] == (4 + 4 + 1 + 0) / 4


# ----------------------------------------------------------------------------------------------
# fast == trie == reference on random batches


@FAST
@given(batches(), st.sampled_from(["group", "batch", "none"]), st.sampled_from([1.0, 0.0, 0.5, -2.0]),
       st.booleans())
def test_tempo_three_ways(batch, scale, td_weight, scale_td):
    responses, mask, rewards, G = batch
    T = responses.shape[1]
    fast = adv.tempo_advantages(responses, mask, rewards, G, td_weight=td_weight, scale=scale,
                                scale_td=scale_td)
    tree = adv.prefix_tree(responses, mask, G)  # a tree built once and passed changes nothing, bit for bit
    assert torch.equal(fast, adv.tempo_advantages(responses, mask, rewards, G, td_weight=td_weight, scale=scale,
                                                  scale_td=scale_td, tree=tree))
    slow = trie_batch.tempo_batch(responses, mask, rewards, G, td_weight=td_weight, scale=scale,
                            scale_td=scale_td)
    ref = padded(reference(responses, mask, rewards, G, scale=scale, td_weight=td_weight,
                           scale_td=scale_td)["tempo"], T).float()
    assert fast.dtype == torch.float32 and fast.shape == responses.shape
    torch.testing.assert_close(fast, ref, **TOL)
    torch.testing.assert_close(slow, ref, **TOL)
    assert (fast[~mask] == 0).all()


@FAST
@given(batches(), st.sampled_from(["group", "batch", "none"]))
def test_treeadv_grpo_counts_three_ways(batch, scale):
    responses, mask, rewards, G = batch
    T = responses.shape[1]
    ref = reference(responses, mask, rewards, G, scale=scale)
    fast = adv.treeadv_advantages(responses, mask, rewards, G, scale=scale)
    tree = adv.prefix_tree(responses, mask, G)
    assert torch.equal(fast, adv.treeadv_advantages(responses, mask, rewards, G, scale=scale, tree=tree))
    torch.testing.assert_close(fast, padded(ref["treeadv"], T).float(), **TOL)
    torch.testing.assert_close(trie_batch.treeadv_batch(responses, mask, rewards, G, scale=scale),
                               padded(ref["treeadv"], T).float(), **TOL)
    torch.testing.assert_close(adv.grpo_advantages(rewards, G, scale=scale),
                               torch.tensor(ref["grpo"], dtype=torch.float32), **TOL)
    counts = adv.prefix_counts(responses, mask, G)
    assert counts.dtype == torch.int64
    assert counts.tolist() == padded(ref["counts"], T, torch.int64).tolist()
    assert trie_batch.prefix_counts_batch(responses, mask, G).tolist() == counts.tolist()
    assert torch.equal(adv.prefix_counts(responses, mask, G, tree=tree), counts)
    # as train.py does: this rank's whole groups, narrower T, the rows of the whole batch's tree
    lo = G * (responses.shape[0] // G // 2)
    T_mine = int(mask[lo:].sum(1).max())
    mine = adv.prefix_counts(responses[lo:, :T_mine], mask[lo:, :T_mine], G, tree=tree.rows(slice(lo, None)))
    assert torch.equal(mine, counts[lo:, :T_mine])


@FAST
@given(batches())
def test_diagnostics_three_ways(batch):
    responses, mask, rewards, G = batch
    fast = adv.branch_diagnostics(responses, mask, rewards, G)
    slow = trie_batch.diagnostics_batch(responses, mask, rewards, G)
    ref = ref_diagnostics(responses, mask, rewards, G)
    assert set(fast) == set(ref) == set(slow)
    shared = adv.branch_diagnostics(responses, mask, rewards, G, tree=adv.prefix_tree(responses, mask, G))
    assert all(shared[k] == fast[k] or math.isnan(shared[k]) and math.isnan(fast[k]) for k in fast)
    for key in ref:
        for got in (fast[key], slow[key]):
            if math.isnan(ref[key]):
                assert math.isnan(got), key
            else:
                assert got == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key


@settings(max_examples=150, deadline=None)
@given(batches(max_G=6, max_T=12), st.integers(1, 3))
def test_pairwise_lcp_small_windows(batch, window):
    # windows of 1-3 tokens make the doubling loop cross many window edges
    responses, mask, _, G = batch
    rows = ref_rows(responses, mask)
    lcp = adv.pairwise_lcp(responses, mask, G, window=window)
    expected = [[ref_lcp(rows[i], rows[i - i % G + k]) for k in range(G)] for i in range(len(rows))]
    assert lcp.tolist() == expected
    # the tree: each row's lcp values ascending, `order` the column each came from (a permutation)
    tree = adv.prefix_tree(responses, mask, G)
    assert tree.lcp_sorted.tolist() == [sorted(row) for row in expected]
    assert torch.equal(lcp.gather(1, tree.order), tree.lcp_sorted)
    assert torch.equal(tree.order.sort(1).values, torch.arange(G).expand(len(rows), G))


def test_long_shared_prefixes_cross_windows():
    # shared prefixes of 63..65, 191..193 and 447..449 tokens sit on the edges of the doubling windows
    gen = torch.Generator().manual_seed(0)
    T, G = 520, 4
    responses = torch.randint(0, 50, (6 * G, T), generator=gen)
    lengths = torch.randint(T // 2, T + 1, (6 * G,), generator=gen)
    for i, share in enumerate([63, 64, 65, 191, 192, 193, 447, 448, 449, 519, 520, 0] * 2):
        if i % G:
            responses[i, :share] = responses[i - 1, :share]
            lengths[i] = max(lengths[i], min(share, int(lengths[i - 1])))
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (6 * G,), generator=gen).float()
    ref = reference(responses, mask, rewards, G)
    torch.testing.assert_close(adv.tempo_advantages(responses, mask, rewards, G),
                               padded(ref["tempo"], T).float(), **TOL)
    torch.testing.assert_close(adv.treeadv_advantages(responses, mask, rewards, G),
                               padded(ref["treeadv"], T).float(), **TOL)
    assert adv.prefix_counts(responses, mask, G).tolist() == padded(ref["counts"], T, torch.long).tolist()


def test_sampled_like_batch_matches_trie():
    # the benchmark's batch shape (long rows, few shared tokens, variable lengths), smaller
    from benchmarks.bench_advantages import sampled_like_batch

    for G in (1, 3, 8):
        responses, mask, rewards = sampled_like_batch(4 * G, G, 300, 20, seed=G)
        torch.testing.assert_close(adv.tempo_advantages(responses, mask, rewards, G),
                                   trie_batch.tempo_batch(responses, mask, rewards, G), **TOL)
        torch.testing.assert_close(adv.treeadv_advantages(responses, mask, rewards, G),
                                   trie_batch.treeadv_batch(responses, mask, rewards, G), **TOL)


# ----------------------------------------------------------------------------------------------
# Edge cases named in the issue, spelled out


def test_edge_cases_explicit():
    T = 5
    # group 0: identical rows; group 1: "a b" strict prefix of "a b c" with garbage padding equal to
    # the sibling's next token; group 2: an empty row; group 3: all equal rewards
    responses = torch.tensor([[1, 2, 3, 0, 0], [1, 2, 3, 0, 0],
                              [1, 2, 3, 3, 3], [1, 2, 3, 0, 0],
                              [2, 2, 2, 2, 2], [2, 1, 0, 0, 0],
                              [4, 5, 0, 0, 0], [4, 6, 0, 0, 0]])
    lengths = torch.tensor([3, 3, 2, 3, 0, 2, 2, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.3, 0.3])
    s = math.sqrt(0.5) + 1e-6
    A = adv.tempo_advantages(responses, mask, rewards, 2)
    # identical rows with different rewards: D never splits, so every delta is 0 (GRPO)
    torch.testing.assert_close(A[0, :3], torch.full((3,), 0.5 / s), **TOL)
    # strict prefix: row 2 ("a b") keeps A_i, row 3 gets delta = 1 - 0.5 on its last token
    torch.testing.assert_close(A[2, :2], torch.full((2,), -0.5 / s), **TOL)
    torch.testing.assert_close(A[3, :3], torch.tensor([0.5 / s, 0.5 / s, 1.0 / s]), **TOL)
    # empty row: no tokens; its sibling's first token leaves the root: delta = 0 - 0.5
    assert (A[4] == 0).all()
    torch.testing.assert_close(A[5, :2], torch.tensor([-1.0 / s, -0.5 / s]), **TOL)
    # equal rewards: exactly zero (not 1e-8)
    assert (A[6:] == 0).all() and (adv.treeadv_advantages(responses, mask, rewards, 2)[6:] == 0).all()
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004: mu != r in floats, yet every advantage is exactly 0
    assert (adv.grpo_advantages(torch.full((6,), 0.1, dtype=torch.float64), 3) == 0).all()
    three = torch.tensor([[1, 2], [1, 3], [1, 2], [4, 4], [4, 5], [6, 6]])
    tenth = torch.full((6,), 0.1, dtype=torch.float64)
    assert (adv.tempo_advantages(three, torch.ones_like(three, dtype=torch.bool), tenth, 3) == 0).all()
    assert (adv.treeadv_advantages(three, torch.ones_like(three, dtype=torch.bool), tenth, 3) == 0).all()
    assert (adv.hepo_advantages(torch.rand(6, 2), torch.ones(6, 2, dtype=torch.bool), tenth, 3, rho=1.0)
            == 0).all()
    assert (adv.tempo_advantages(responses, mask, torch.full((8,), 0.7), 2, scale="batch") == 0).all()
    torch.testing.assert_close(A, trie_batch.tempo_batch(responses, mask, rewards, 2), **TOL)


def test_group_of_one_and_empty_shapes():
    responses = torch.tensor([[3, 4, 5], [3, 4, 9]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rewards = torch.tensor([1.0, -2.0])
    for scale, denom in (("group", 1 + 1e-6), ("batch", 1 + 1e-6), ("none", 1.0)):
        expect = (rewards / denom)[:, None] * mask
        torch.testing.assert_close(adv.tempo_advantages(responses, mask, rewards, 1, scale=scale), expect)
        torch.testing.assert_close(adv.treeadv_advantages(responses, mask, rewards, 1, scale=scale), expect)
    assert adv.prefix_counts(responses, mask, 1).tolist() == [[1, 1, 0], [1, 1, 1]]
    d = adv.branch_diagnostics(responses, mask, rewards, 1)
    assert d["branch_token_frac"] == 0.0 and d["td_share"] == 0.0
    assert math.isnan(d["first_divergence_depth"]) and math.isnan(d["unique_depth"])
    # T = 0 and all-empty rows: shapes kept, nothing to credit
    for T in (0, 3):
        r = torch.tensor([1.0, 0.0])
        empty = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.bool)
        assert adv.tempo_advantages(*empty, r, 2).shape == (2, T)
        assert adv.treeadv_advantages(*empty, r, 2).shape == (2, T)
        assert adv.branch_diagnostics(*empty, r, 2)["branch_token_frac"] == 0.0


# ----------------------------------------------------------------------------------------------
# Identities


@FAST
@given(batches())
def test_identities(batch):
    responses, mask, rewards, G = batch
    B, T = responses.shape
    grpo = adv.grpo_advantages(rewards, G)
    # td_weight = 0 is GRPO broadcast over tokens, bit for bit
    A0 = adv.tempo_advantages(responses, mask, rewards, G, td_weight=0.0)
    assert torch.equal(A0, torch.where(mask, grpo[:, None], 0.0))
    # the TD term, unscaled: delta = A_tempo - A_grpo with scale "none"
    delta = (adv.tempo_advantages(responses, mask, rewards, G, scale="none").double()
             - adv.tempo_advantages(responses, mask, rewards, G, scale="none", td_weight=0.0).double())
    # delta = 0 off branch nodes: s_t branches exactly when n(s_{t+1}) < n(s_t), n(s_0) = G
    n_next = adv.prefix_counts(responses, mask, G)
    n_now = torch.cat([torch.full((B, 1), G), n_next[:, :-1]], 1)
    branch = (n_next < n_now) & mask
    assert (delta[~branch] == 0).all()
    # telescoping: sum_t delta = V(s_L) - mu, which is r_i - mu when no other row contains all of o_i
    rows = ref_rows(responses, mask)
    r = rewards.tolist()
    for i, o in enumerate(rows):
        g0 = i - i % G
        group, gr = rows[g0:g0 + G], r[g0:g0 + G]
        if G < 2 or ref_equal(gr):
            continue
        mu = statistics.fmean(gr)
        assert float(delta[i].sum()) == pytest.approx(ref_V(group, gr, i - g0, len(o)) - mu, abs=1e-5)
        if ref_D(group, i - g0, len(o)) == [i - g0]:
            assert float(delta[i].sum()) == pytest.approx(r[i] - mu, abs=1e-5)
    # TreeAdv: over the rows sharing token t's node, the sum of Ahat = the sum of their GRPO A_j
    tree = adv.treeadv_advantages(responses, mask, rewards, G)
    for i, o in enumerate(rows):
        g0 = i - i % G
        for t in range(len(o)):
            sharing = [g0 + j for j in ref_D(rows[g0:g0 + G], i - g0, t + 1)]
            assert float(tree[sharing, t].double().sum()) == pytest.approx(
                float(grpo[sharing].double().sum()), abs=1e-4)


def test_telescoping_with_eos():
    # rows that end with EOS (and rewards a function of the text): sum_t delta = r_i - mu exactly as SPEC 3
    gen = torch.Generator().manual_seed(1)
    G, T, EOS = 6, 12, 9
    responses = torch.randint(0, 2, (5 * G, T), generator=gen)
    lengths = torch.randint(1, T + 1, (5 * G,), generator=gen)
    responses[torch.arange(5 * G), lengths - 1] = EOS
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.tensor([float(sum(row[:n]) % 3) for row, n in zip(responses.tolist(), lengths.tolist())])
    delta = (adv.tempo_advantages(responses, mask, rewards, G, scale="none")
             - adv.tempo_advantages(responses, mask, rewards, G, scale="none", td_weight=0.0))
    mu = rewards.view(-1, G).mean(1).repeat_interleave(G)
    equal = (rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1).repeat_interleave(G)
    torch.testing.assert_close(delta.sum(1)[~equal], (rewards - mu)[~equal], **TOL)


# ----------------------------------------------------------------------------------------------
# HEPO


def test_hepo_by_hand():
    # 10 valid tokens, rho = 0.3: k = 3 -> entropies 0.9, then the two 0.5s (tie: earlier first)
    entropy = torch.tensor([[0.1, 0.5, 0.2, 7.0], [0.9, 0.3, 0.5, 0.5], [0.0, 0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)  # 7.0 is padding
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])[:3]  # G = 3
    A = adv.hepo_advantages(entropy, mask, rewards, 3, rho=0.3)
    s = math.sqrt(1 / 3) + 1e-6  # rewards [1, 0, 0]: mu = 1/3, sigma = sqrt(1/3)
    expect = torch.zeros(3, 4)
    expect[0, 1] = (2 / 3) / s  # 0.5 at (0, 1)
    expect[1, 0] = (-1 / 3) / s  # 0.9
    expect[1, 2] = (-1 / 3) / s  # 0.5 at (1, 2); (1, 3) and (2, 2) lose the tie
    torch.testing.assert_close(A, expect, **TOL)
    torch.testing.assert_close(A, ref_hepo(entropy, mask, rewards, 3, rho=0.3), **TOL)
    assert (adv.hepo_advantages(entropy, mask, rewards, 3, rho=0.0) == 0).all()
    torch.testing.assert_close(adv.hepo_advantages(entropy, mask, rewards, 3, rho=1.0),
                               adv.grpo_advantages(rewards, 3)[:, None] * mask, **TOL)


@FAST
@given(batches(), st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.data())
def test_hepo_against_reference(batch, rho, data):
    responses, mask, rewards, G = batch
    B, T = responses.shape
    H = data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, float("nan")]),
                           min_size=B * T, max_size=B * T))
    entropy = torch.tensor(H, dtype=torch.float32).view(B, T)
    entropy = torch.where(mask, entropy.nan_to_num(0.75), entropy)  # nan only in padding
    torch.testing.assert_close(adv.hepo_advantages(entropy, mask, rewards, G, rho=rho),
                               ref_hepo(entropy, mask, rewards, G, rho=rho), **TOL)


# ----------------------------------------------------------------------------------------------
# dtypes and devices


@settings(max_examples=40, deadline=None)
@given(batches())
def test_float64_inputs_equal_float32_inputs(batch):
    responses, mask, rewards, G = batch
    r64 = rewards.double()  # the float32 values, exactly
    ids32 = responses.int()
    for fn in (adv.tempo_advantages, adv.treeadv_advantages):
        a, b = fn(responses, mask, rewards, G), fn(ids32, mask.long(), r64, G)
        assert b.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(adv.grpo_advantages(rewards, G), adv.grpo_advantages(r64, G))


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
    entropy = torch.rand(responses.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adv.hepo_advantages(entropy.cuda(), cuda[1], cuda[2], 8).cpu(),
                               adv.hepo_advantages(entropy, mask, rewards, 8), **TOL)


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument


def _good():
    responses = torch.tensor([[1, 2, 0], [1, 3, 3]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return responses, mask, torch.tensor([1.0, 0.0])


@pytest.mark.parametrize("fn, takes_rewards", [
    (adv.tempo_advantages, True), (adv.treeadv_advantages, True), (adv.branch_diagnostics, True),
    (lambda responses, mask, rewards, G: adv.prefix_counts(responses, mask, G), False)])
def test_bad_inputs(fn, takes_rewards):
    responses, mask, rewards = _good()
    fn(responses, mask, rewards, 2)  # the good case runs
    cases = [
        ((responses[:, :2], mask, rewards, 2), "mask"),  # shape mismatch
        ((responses[0], mask[0], rewards, 2), "responses"),  # not 2-D
        ((responses.float(), mask, rewards, 2), "responses"),  # not ids
        ((responses, torch.tensor([[True, False, True], [True, True, True]]), rewards, 2), "prefix mask"),
        ((responses, mask.float() * 0.5, rewards, 2), "mask"),
        ((responses, mask, rewards, 3), "group_size"),  # does not divide B
        ((responses, mask, rewards, 0), "group_size"),
        ((responses, mask, rewards, 2.0), "group_size"),
    ]
    if takes_rewards:
        cases += [
            ((responses, mask, torch.tensor([1.0, float("nan")]), 2), "rewards"),
            ((responses, mask, torch.tensor([1.0, float("inf")]), 2), "rewards"),
            ((responses, mask, torch.tensor([1.0, 0.0, 1.0]), 2), "rewards"),
            ((responses, mask, torch.tensor([[1.0, 0.0]]), 2), "rewards"),
        ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            fn(*args)


def _prefix_counts_with_tree(responses, mask, rewards, G, tree):
    return adv.prefix_counts(responses, mask, G, tree=tree)


@pytest.mark.parametrize("fn", [adv.tempo_advantages, adv.treeadv_advantages, adv.branch_diagnostics,
                                _prefix_counts_with_tree])
def test_bad_tree(fn):
    # a tree that is not these rows' would read other rows' prefix sets without an error
    responses, mask, rewards = _good()
    fn(responses, mask, rewards, 2, tree=adv.prefix_tree(responses, mask, 2))  # the good case runs
    four = torch.cat([responses, responses]), torch.cat([mask, mask])
    swapped = adv.prefix_tree(responses.flip(0), mask.flip(0), 2)  # [2, 2], but rows of lengths 3, 2
    for tree in (adv.prefix_tree(*four, 2),  # the whole batch's tree for half of it
                 adv.prefix_tree(responses, mask, 1),  # another group size: [B, 1]
                 adv.PrefixTree(swapped.lcp_sorted, swapped.order[:, :1]),
                 tuple(adv.prefix_tree(responses, mask, 2)),  # not a PrefixTree
                 swapped):
        with pytest.raises(ValueError, match="tree"):
            fn(responses, mask, rewards, 2, tree=tree)


def test_bad_scalars():
    responses, mask, rewards = _good()
    for kw, name in [(dict(eps=-1.0), "eps"), (dict(eps=float("nan")), "eps"), (dict(scale="std"), "scale"),
                     (dict(td_weight=float("inf")), "td_weight")]:
        with pytest.raises(ValueError, match=name):
            adv.tempo_advantages(responses, mask, rewards, 2, **kw)
    with pytest.raises(ValueError, match="scale"):
        adv.grpo_advantages(rewards, 2, scale="Group")
    with pytest.raises(ValueError, match="rewards"):
        adv.grpo_advantages(torch.tensor([]), 1)
    with pytest.raises(ValueError, match="group_size"):
        adv.grpo_advantages(rewards, 3)
    entropy = torch.rand(2, 3)
    for kw, name in [(dict(rho=1.5), "rho"), (dict(rho=-0.1), "rho"), (dict(scale="x"), "scale")]:
        with pytest.raises(ValueError, match=name):
            adv.hepo_advantages(entropy, mask, rewards, 2, **kw)
    with pytest.raises(ValueError, match="entropy"):
        adv.hepo_advantages(torch.tensor([[0.1, float("nan"), 0.2], [0.1, 0.2, 0.3]]), mask, rewards, 2)
    with pytest.raises(ValueError, match="mask"):
        adv.hepo_advantages(entropy, mask[:, :2], rewards, 2)
    with pytest.raises(ValueError, match="entropy"):
        adv.hepo_advantages(responses, mask, rewards, 2)  # integer "entropy"
