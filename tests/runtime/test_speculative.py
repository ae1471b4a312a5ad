"""Self-speculative decoding: greedy equals plain greedy token for token; sampling keeps the full model's distribution."""
from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import chisquare

from dlexport.errors import CorruptFileError, FolderError
from dlexport.pipeline import export
from dlexport.exporter.draft_head import subset_head
from dlexport.files import sha256_file
from dlexport.runtime import Plan, PlanError, Runtime, Sampling
from dlexport.runtime.plan import Draft, DraftHeadRef
from dlexport.runtime.sampling import probabilities
from dlexport.runtime.speculative import Lookup, SkipSearch, Speculator, accept, expected_speedup


def _prompts(vocab: int, lengths=(9, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["tiny_llama_export", "tiny_opt_export", "tiny_llama_portable_export",
                                        "tiny_opt_portable_export"])
def tiny_runtime(request):
    return Runtime.load(request.getfixturevalue(request.param).folder)


@pytest.fixture(scope="module")
def quiet_runtime(tmp_path_factory):
    out = tmp_path_factory.mktemp("quiet") / "export"
    return Runtime.load(export("tiny-llama-quiet", out, random_weights=True, progress=False, log=lambda *a: None).folder)


@pytest.mark.parametrize("draft", [(0,), (0, 1), (0, 2), (1, 3)], ids=["prefix1", "prefix2", "skip", "skip-first"])
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_equals_plain_greedy(tiny_runtime, draft, batch):
    rt = tiny_runtime
    prompts = _prompts(rt.manifest.arch["vocab_size"])[:batch]
    plan = Plan.full(rt.manifest)
    plain = rt.generate(prompts, 24, plan, stop_tokens=[])
    for k, adaptive in [(1, False), (3, False), (4, True)]:
        spec = rt.generate(prompts, 24, plan, stop_tokens=[], strategy="speculative", draft=Draft(draft, k, adaptive),
                           memory=False)
        assert spec.tokens == plain.tokens, (draft, k, adaptive)
        assert spec.extra["strategy"] == "speculative"
        assert spec.extra["probes"] > 0 if adaptive else spec.extra["drafted"] > 0


def test_greedy_with_a_skip_plan_and_stop_tokens(tiny_runtime):
    rt = tiny_runtime
    prompts = _prompts(rt.manifest.arch["vocab_size"])
    plan = Plan.skip(rt.manifest, (0, 1, 3))
    plain = rt.generate(prompts, 20, plan, stop_tokens=[])
    stop = plain.tokens[0][6]  # a token the first row emits mid-way: it must stop there, the other row go on
    plain = rt.generate(prompts, 20, plan, stop_tokens=[stop])
    spec = rt.generate(prompts, 20, plan, stop_tokens=[stop], strategy="speculative", draft=Draft((0,), 3, False))
    assert spec.tokens == plain.tokens


def test_best_case_model_accepts_almost_every_draft(quiet_runtime):
    rt = quiet_runtime
    prompts = _prompts(rt.manifest.arch["vocab_size"])
    plan = Plan.full(rt.manifest)
    plain = rt.generate(prompts, 32, plan, stop_tokens=[])
    spec = rt.generate(prompts, 32, plan, stop_tokens=[], strategy="speculative", draft=Draft((0,), 4, True))
    assert spec.tokens == plain.tokens
    assert spec.extra["acceptance_rate"] > 0.9 and not spec.extra["switched_off"]
    assert spec.extra["switched_on"] == 1 and spec.extra["probes"] == 4  # shadow probes until 3 (decayed) agree
    assert spec.mean_layers < 0.6 * len(plan.layers), spec.extra  # 1 draft layer x 4 + 4 verify layers per ~5 tokens


def test_adaptive_stays_off_and_probes_at_a_bounded_rate(tiny_opt_export):
    """Drafts that fail: plain steps (sampling draws exactly plain's random numbers), probes ever more rarely."""
    rt = Runtime.load(tiny_opt_export.folder)
    prompts = _prompts(rt.manifest.arch["vocab_size"])[:1]
    plan = Plan.full(rt.manifest)
    plain = rt.generate(prompts, 48, plan, stop_tokens=[])
    spec = rt.generate(prompts, 48, plan, stop_tokens=[], strategy="speculative", draft=Draft((0, 1, 2), 4, True))
    assert spec.tokens == plain.tokens
    assert not spec.extra["switched_on"] and not spec.extra["drafted"], spec.extra
    # a probe costs the head and a call, 1.7 of the plan's 4.7 layer-units: one per 19 tokens keeps them under 2%,
    # with a hit followed up at once
    assert spec.extra["probe_cost"] > 1.0 and 2 <= spec.extra["probes"] <= 5, spec.extra
    fixed = rt.generate(prompts, 48, plan, stop_tokens=[], strategy="speculative", draft=Draft((0, 1, 2), 4, False))
    assert fixed.extra["probes"] == 0 and fixed.extra["drafted"] > 40
    sampling = Sampling(temperature=1.0, seed=3)
    plain = rt.generate(prompts * 2, 48, plan, stop_tokens=[], sampling=sampling)
    spec = rt.generate(prompts * 2, 48, plan, stop_tokens=[], sampling=sampling, strategy="speculative",
                       draft=Draft((0, 1, 2), 4, True), memory=False)
    assert spec.extra["probes"] >= 1 and not spec.extra["drafted"], spec.extra
    assert spec.tokens == plain.tokens  # never switched on: the very same tokens as plain sampling


def test_probe_policy_backs_off_and_switches_on_and_off():
    spec = Speculator((0, 1), 2, 4, True, draft_cost=3.0, plan_cost=10.0, plan_layers=8, probe_cost=0.2,
                      overhead=0.0, verify_extra=0.0, probe_overhead=0.0)
    assert spec.interval == 1 and spec.k == 0 and spec.probe_due(0)
    n, due = 0, []
    for _ in range(6):  # failed probes: the interval doubles up to the cap
        n = spec.next_probe
        due.append(n)
        spec.probed(n, 0.0)
    assert due == [0, 2, 6, 14, 30, 62] and not spec.k and not spec.probe_due(n + 1)
    for _ in range(2):
        spec.probed(spec.next_probe, 1.0)
    assert not spec.k  # two hits do not yet outweigh the (decayed) misses by the margin
    spec.probed(spec.next_probe, 1.0)
    assert spec.k > 0 and spec.switched_on == 1 and spec.interval == 1
    for rounds in range(1, 9):
        spec.update(100, spec.k, 0)  # rounds whose drafts are all rejected switch it off again
        if not spec.k:
            break
    assert rounds <= 5
    assert spec.k == 0 and spec.switched_off == 1 and "switched off" in spec.off_message
    assert spec.next_probe > 100
    skip = Speculator((0, 2), 1, 4, True, draft_cost=3.0, plan_cost=10.0, plan_layers=8, probe_cost=3.0)
    assert not skip.shadow and skip.interval == 15  # a real one-token probe costs 3 units: at most 2% of 10 per token
    assert skip.next_k(0, 10) == 1 and skip.next_k(0, 1) == 0  # a probe round, unless one token is left
    skip.update(0, 1, 0)  # its draft was rejected
    assert skip.next_k(1, 10) == 0 and skip.next_probe == 30 and skip.probes == 1


def test_depth_search_moves_the_draft_to_the_depth_that_pays():
    costs = tuple(0.5 * d for d in range(9))  # prefix d of an 8-layer plan costs d/2 layer-units
    spec = Speculator((0,), 1, 4, True, draft_cost=1.05, plan_cost=9.0, plan_layers=8, probe_cost=0.05,
                      head_cost=0.05, prefix_costs=costs, candidates=(1, 2, 4, 6), plan_order=tuple(range(8)),
                      probe_overhead=0.0)
    assert spec.base_interval == 1
    seen, n = set(), 0
    while not spec.depth_moves and n < 8:
        seen |= set(spec.scored_depths())
        spec.observe_depth(6, 1.0, 0.0)  # a deep prefix that always agrees; the current one never does
        spec.probed(n, 0.0)
        n += 1
    assert {2, 4, 6} <= seen and n == 4  # once depth 6 has 3 (decayed) observations: 1 + .85 + .72 + .61
    assert spec.layers == tuple(range(6)) and spec.shared == 6 and spec.depth_moves == 1
    assert spec.draft_cost == pytest.approx(3.05) and spec.k > 0  # and the draft switched on there
    assert spec.interval == 1  # moving to a depth that hits keeps probing often


@pytest.mark.parametrize("batch", [1, 2])
def test_skip_set_search_greedy_equals_plain_greedy(tiny_runtime, batch):
    """Its trials run other layer sets over the last positions and restore the plan's key/values after."""
    rt = tiny_runtime
    prompts = _prompts(rt.manifest.arch["vocab_size"])[:batch]
    plan = Plan.full(rt.manifest)
    plain = rt.generate(prompts, 40, plan, stop_tokens=[])
    spec = rt.generate(prompts, 40, plan, stop_tokens=[], strategy="speculative", draft=Draft((1, 3), 3, True),
                       search=0.5, memory=False)
    assert spec.tokens == plain.tokens and spec.extra["skip_trials"] >= 2, spec.extra


@pytest.mark.parametrize("batch", [1, 2])
def test_skip_set_search_finds_the_layers_that_agree(quiet_runtime, batch):
    """Only layer 0 of the quiet model matters: from a draft without it the search moves to layer 0 alone."""
    rt = quiet_runtime
    prompts = _prompts(rt.manifest.arch["vocab_size"])[:batch]
    plan = Plan.full(rt.manifest)
    plain = rt.generate(prompts, 96, plan, stop_tokens=[])
    spec = rt.generate(prompts, 96, plan, stop_tokens=[], strategy="speculative", draft=Draft((1, 2), 4, True),
                       search=0.5, memory=False)
    assert spec.tokens == plain.tokens
    assert spec.extra["draft_layers"] == [0] and spec.extra["skip_moves"] >= 2, spec.extra
    assert spec.extra["acceptance_rate"] > 0.9 and spec.extra["final_k"] == 4, spec.extra


def test_skip_set_search_policy():
    """Neighbours drop and add a layer in turn (never the whole plan); a better one is adopted, else it backs off."""
    costs = {i: 1.0 for i in range(4)}
    search = SkipSearch((1, 2), (0, 1, 2, 3), lambda s: sum(costs[i] for i in s), lambda a, c: a * 4 / (c + 1), 5.0,
                        budget=0.5, window=4)
    assert search.neighbour in {(1,), (2,)} and search.interval == 2  # (2 + 1) layers x 1.48 / (0.5 x 5), rounded up
    assert not search.due(4) and search.due(5)  # and the first trial needs 4 generated positions before it
    moved = search.scored(5, {(1, 2): 0.0, search.neighbour: 4.0}, 4)  # the neighbour agrees everywhere
    assert moved is not None and search.layers == moved and search.moves == 1
    assert len(search.neighbour) == 2 and search.neighbour != (0, 1, 2, 3)  # then a layer is added
    before = search.interval
    assert search.scored(20, {search.layers: 4.0, search.neighbour: 0.0}, 4) is None  # a worse one is not taken
    assert search.interval == 2 * max(before, search.base_interval) and search.next_trial == 20 + search.interval
    full = SkipSearch((0, 1, 2), (0, 1, 2, 3), lambda s: float(len(s)), lambda a, c: 1.0, 5.0)
    for _ in range(6):
        assert full.neighbour != (0, 1, 2, 3)
        full.scored(100, {}, 4)


def test_what_a_request_learns_carries_to_the_next(quiet_runtime):
    """The next request with the same plan and draft starts where the last one ended; memory=False starts fresh."""
    rt = quiet_runtime
    prompts = _prompts(rt.manifest.arch["vocab_size"])[:1]
    plan = Plan.skip(rt.manifest, (0, 1, 2, 3), name="carry")
    plain = rt.generate(prompts, 48, plan, stop_tokens=[])
    kw = dict(stop_tokens=[], strategy="speculative", draft=Draft((1, 2), 4, True), search=0.5)
    first = rt.generate(prompts, 48, plan, **kw)
    second = rt.generate(prompts, 48, plan, **kw)
    fresh = rt.generate(prompts, 48, plan, memory=False, **kw)
    assert first.tokens == second.tokens == fresh.tokens == plain.tokens
    assert first.extra["draft_layers"] == [0] and first.extra["skip_moves"] >= 2
    assert second.extra["draft_layers"] == [0] and second.extra["skip_moves"] == 0  # it started there
    assert second.extra["probes"] == 0 and second.extra["drafted"] > first.extra["drafted"]  # and drafting at once
    assert fresh.extra["skip_moves"] >= 2


def _periodic(batch: int) -> list[list[int]]:
    return [[5, 6, 7, 8] * 4 + [5, 6], [9, 10, 11] * 4 + [9]][:batch]  # text that repeats: lookups find matches


@pytest.mark.parametrize("batch", [1, 2])
def test_lookup_greedy_equals_plain_greedy(tiny_runtime, batch):
    rt = tiny_runtime
    plan = Plan.full(rt.manifest)
    plain = rt.generate(_periodic(batch), 32, plan, stop_tokens=[])
    spec = rt.generate(_periodic(batch), 32, plan, stop_tokens=[], strategy="speculative", draft=Draft((0,), 3, True),
                       lookup=1, memory=False)
    assert spec.tokens == plain.tokens and spec.extra["lookup_rounds"] > 0, spec.extra


def test_lookup_sampling_runs_rounds_and_draws_real_tokens(tiny_llama_export):
    """The one-hot draft path (its distribution is the accept test's deterministic case)."""
    rt = Runtime.load(tiny_llama_export.folder)
    out = rt.generate(_periodic(1), 24, stop_tokens=[], strategy="speculative", draft=Draft((0,), 3, True), lookup=1,
                      sampling=Sampling(temperature=0.5, seed=1), memory=False)
    assert out.extra["lookup_rounds"] > 0 and len(out.tokens[0]) == 24
    assert all(0 <= t < rt.manifest.arch["vocab_size"] for t in out.tokens[0])


def test_lookup_continuation():
    look = Lookup(2, 4, 10.0)
    done, start = torch.tensor([False]), torch.tensor([0])
    seq = torch.tensor([[1, 2, 3, 4, 1, 2]])
    assert look.continuation(seq, start, done, 4).tolist() == [[3, 4, 1, 2]]  # what followed the earlier (1, 2)
    assert look.continuation(seq, start, done, 2).tolist() == [[3, 4]]
    assert look.continuation(seq, torch.tensor([1]), done, 4) is None  # the match lies in the left padding
    assert look.continuation(torch.tensor([[1, 2, 3, 4, 5, 6]]), start, done, 4) is None
    two = torch.tensor([[1, 2, 3, 1, 2, 9, 1, 2], [7, 7, 7, 7, 7, 7, 7, 7]])
    assert look.continuation(two, torch.tensor([0, 0]), torch.tensor([False, False]), 4).tolist() == \
        [[9], [7]]  # the latest match per row (row 1's is one token before its end), cut to the shorter one
    assert look.continuation(torch.tensor([[1, 2, 3, 1, 2], [4, 5, 6, 7, 8]]), torch.tensor([0, 0]),
                             torch.tensor([False, True]), 4).tolist()[0] == [3, 1, 2]  # a stopped row never blocks


def test_lookup_policy_backs_off_after_failures():
    look = Lookup(3, 4, 10.0)
    assert look.due(0) and look.gain() > 1.0  # an even prior: the first match is tried
    for n in range(0, 100, 5):
        look.update(n, 4, 0)
    assert look.gain() < 1.0 and look.interval == look.max_interval and not look.due(look.next_try - 1)
    look.update(look.next_try, 4, 4)
    look.update(look.next_try, 4, 4)
    assert look.gain() > 1.0 and look.interval == 1 and look.accepted == 8


def test_learning_saved_to_a_file_starts_the_next_process_there(quiet_runtime, tmp_path):
    rt = Runtime.load(quiet_runtime.manifest.folder)  # nothing learned yet
    prompts = _prompts(rt.manifest.arch["vocab_size"])[:1]
    plan = Plan.skip(rt.manifest, (0, 1, 2, 3), name="saved")
    kw = dict(stop_tokens=[], strategy="speculative", draft=Draft((1, 2), 4, True), search=0.5)
    first = rt.generate(prompts, 48, plan, **kw)
    assert first.extra["draft_layers"] == [0]
    rt.save_learning(tmp_path / "learned.json")
    fresh = Runtime.load(rt.manifest.folder)
    assert fresh.load_learning(tmp_path / "learned.json") >= 1
    second = fresh.generate(prompts, 48, plan, **kw)
    assert second.tokens == first.tokens and second.extra["draft_layers"] == [0] and not second.extra["skip_moves"]
    assert second.extra["drafted"] > first.extra["drafted"]


def test_learning_files_are_refused_whole_when_wrong(quiet_runtime, tmp_path):
    rt = quiet_runtime
    rt.generate(_prompts(512)[:1], 16, stop_tokens=[], strategy="speculative", draft=Draft((1, 2), 4, True))
    path = tmp_path / "learned.json"
    rt.save_learning(path)
    good = json.loads(path.read_text())
    for change, message in [(lambda d: d.update(format="other"), "is not a dlexport-speculation file"),
                            (lambda d: d.update(model="0" * 16), "learned on another model"),
                            (lambda d: next(iter(d["entries"].values())).update(layers=[0, 9]), "malformed"),
                            (lambda d: next(iter(d["entries"].values())).update(hits=-1), "malformed")]:
        bad = json.loads(json.dumps(good))
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(CorruptFileError, match=message):
            Runtime.load(rt.manifest.folder).load_learning(path)
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(FolderError, match="not a dlexport-speculation file"):
        rt.save_learning(mine)
    assert mine.read_text() == '{"mine": 1}'  # left as it was


def test_expected_speedup():
    assert expected_speedup(4, 1.0, 2.0, 10.0) == pytest.approx(5 * 10 / (4 * 2 + 10))
    assert expected_speedup(1, 0.0, 2.0, 10.0) == pytest.approx(10 / 12)


def test_refuses_drafts_that_cannot_work(tiny_llama_export):
    rt = Runtime.load(tiny_llama_export.folder)
    plan = Plan.skip(rt.manifest, (0, 1, 3))
    with pytest.raises(PlanError, match="not in the plan"):
        rt.generate([1, 2, 3], 4, plan, strategy="speculative", draft=Draft((0, 2)))
    with pytest.raises(PlanError, match="every layer"):
        rt.generate([1, 2, 3], 4, plan, strategy="speculative", draft=Draft((0, 1, 3)))
    with pytest.raises(PlanError, match="needs draft layers"):
        rt.generate([1, 2, 3], 4, plan, strategy="speculative")


# -- the acceptance step on fixed distributions ------------------------------------------------------------------
def test_accept_greedy_takes_the_agreeing_prefix():
    target = torch.full((1, 4, 6), -5.0)
    for i, t in enumerate([2, 3, 1, 5]):
        target[0, i, t] = 5.0
    outcome, accepted = accept(torch.tensor([[2, 3, 4]]), target, None, Sampling(), None)
    assert outcome.tolist() == [[2, 3, 1, 5]] and accepted.tolist() == [[True, True, False]]


def test_accept_sampling_reproduces_the_target_distribution():
    """Over many independent rows: emitted token ~ p, acceptance rate = sum min(p, q), bonus token ~ p_last."""
    n = 200_000
    p0 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    p1 = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.5])
    q = torch.tensor([0.05, 0.1, 0.5, 0.05, 0.3])  # far from p0: plain acceptance would be visibly wrong
    g = torch.Generator().manual_seed(0)
    draft = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=g)
    target_logits = torch.stack([p0.log(), p1.log()])[None].expand(n, -1, -1)
    outcome, accepted = accept(draft, target_logits, q.expand(n, 1, -1), Sampling(temperature=1.0), g)
    for col, p in ((0, p0), (1, p1)):
        counts = torch.bincount(outcome[:, col], minlength=5).double()
        assert chisquare(counts.numpy(), (p * n).double().numpy()).pvalue > 1e-3
    assert accepted.double().mean().item() == pytest.approx(torch.minimum(p0, q).sum().item(), abs=0.005)
    one_hot = torch.nn.functional.one_hot(torch.full((n, 1), 2), 5).float()  # a prompt-lookup (deterministic) draft
    outcome, accepted = accept(torch.full((n, 1), 2), target_logits, one_hot, Sampling(temperature=1.0), g)
    counts = torch.bincount(outcome[:, 0], minlength=5).double()
    assert chisquare(counts.numpy(), (p0 * n).double().numpy()).pvalue > 1e-3
    assert accepted.double().mean().item() == pytest.approx(p0[2].item(), abs=0.005)
    wrong = torch.bincount(draft[:, 0], minlength=5).double()  # the draft's own tokens fail the same test
    assert chisquare(wrong.numpy(), (p0 * n).double().numpy()).pvalue < 1e-6


def _subset_draft(rt, export, folder, layers, k, adaptive, keep: float = 0.5, seed: int = 0) -> Draft:
    """A draft with a cheap head over a random half of the vocabulary (so q is zero on the other half)."""
    vocab = rt.manifest.arch["vocab_size"]
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:int(vocab * keep)].tolist()
    subset_head(export.folder / "head.onnx", ids, folder / "head_subset.onnx")
    return Draft(layers, k, adaptive, DraftHeadRef("head_subset.onnx", sha256_file(folder / "head_subset.onnx"),
                                                   len(ids)), str(folder))


@pytest.mark.parametrize("batch", [1, 2])
def test_subset_draft_head_greedy_equals_plain_greedy(tiny_runtime, request, batch, tmp_path):
    rt = tiny_runtime
    export = request.getfixturevalue(request.node.callspec.params["tiny_runtime"])
    prompts = _prompts(rt.manifest.arch["vocab_size"])[:batch]
    plan = Plan.full(rt.manifest)
    plain = rt.generate(prompts, 24, plan, stop_tokens=[])
    for layers, adaptive, search in [((0, 1), False, None), ((0, 2), False, None), ((0, 1), True, False),
                                     ((0, 1), True, True)]:
        draft = _subset_draft(rt, export, tmp_path, layers, 3, adaptive)
        spec = rt.generate(prompts, 24, plan, stop_tokens=[], strategy="speculative", draft=draft, search=search)
        assert spec.tokens == plain.tokens, (layers, adaptive, search)
    assert spec.extra["depths_scored"]  # the online depth search ran
    assert spec.extra["draft_cost"] < Speculator.for_plan(rt, plan, Draft(layers)).draft_cost  # it is cheaper


@pytest.mark.parametrize("head", ["full-head", "subset-head"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_speculative_sampling_matches_the_models_distribution(tiny_llama_export, tiny_llama_model, adaptive, head,
                                                              tmp_path):
    """Joint frequencies of the first 3 sampled tokens (top-k 3) against the exact distribution from PyTorch."""
    rt = Runtime.load(tiny_llama_export.folder)
    sampling = Sampling(temperature=1.0, top_k=3)
    prompt = _prompts(rt.manifest.arch["vocab_size"], lengths=(6,))[0]
    model = tiny_llama_model.model

    def dist(seq):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[:, -1]
        return probabilities(logits, sampling)[0]

    exact = {}
    p1 = dist(prompt)
    for a in p1.nonzero().flatten().tolist():
        p2 = dist(prompt + [a])
        for b in p2.nonzero().flatten().tolist():
            p3 = dist(prompt + [a, b])
            for c in p3.nonzero().flatten().tolist():
                exact[(a, b, c)] = (p1[a] * p2[b] * p3[c]).item()
    rows, runs = 400, 5
    counts = dict.fromkeys(exact, 0)
    draft = (_subset_draft(rt, tiny_llama_export, tmp_path, (0, 1), 2, adaptive) if head == "subset-head"
             else Draft((0, 1), 2, adaptive))
    drafted = 0
    for seed in range(runs):
        gen = rt.generate([prompt] * rows, 3, Plan.full(rt.manifest), stop_tokens=[], strategy="speculative",
                          draft=draft, sampling=Sampling(1.0, 3, seed=seed), search=adaptive or None)
        drafted += gen.extra["drafted"] + gen.extra["probes"]
        for row in gen.tokens:
            counts[tuple(row)] += 1
    assert drafted > 0
    n = rows * runs
    observed = [counts[key] for key in exact]
    expected = [exact[key] * n for key in exact]
    scale = n / sum(expected)
    assert chisquare(observed, [e * scale for e in expected]).pvalue > 1e-3


@pytest.mark.slow
def test_smollm2_greedy_equals_plain_greedy(smollm2_export):
    rt = Runtime.load(smollm2_export.folder)
    prompts = ["The GNU General Public License is a free, copyleft license for",
               "Permission is hereby granted, free of charge, to any person obtaining"]
    plan = Plan.full(rt.manifest)
    plain = rt.generate(prompts, 24, plan, stop_tokens=[])
    for draft in [tuple(range(12)), tuple(range(0, 30, 2))]:
        spec = rt.generate(prompts, 24, plan, stop_tokens=[], strategy="speculative", draft=Draft(draft, 4, False))
        assert spec.tokens == plain.tokens, draft
        one = rt.generate(prompts[:1], 24, plan, stop_tokens=[], strategy="speculative", draft=Draft(draft, 4, False))
        assert one.tokens == plain.tokens[:1], draft
    quote = open("/usr/share/common-licenses/GPL-3").read()[2000:2600]
    quoted = [quote + " " + quote[:200]]  # continues by quoting itself
    plain = rt.generate(quoted, 32, plan, stop_tokens=[])
    looked = rt.generate(quoted, 32, plan, stop_tokens=[], strategy="speculative", draft=Draft((0,), 4, True),
                         lookup=3, memory=False)
    assert looked.tokens == plain.tokens and looked.extra["lookup_accepted"] > 8, looked.extra
    plain = rt.generate(prompts, 24, plan, stop_tokens=[])
    searched = rt.generate(prompts, 24, plan, stop_tokens=[], strategy="speculative",
                           draft=Draft(tuple(range(0, 30, 2)), 4, True), search=0.5, memory=False)
    assert searched.tokens == plain.tokens and searched.extra["skip_trials"] >= 2, searched.extra


@pytest.mark.slow
def test_smollm2_depth_search_runs_whole_blocks(smollm2_export, tmp_path):
    """The depth search's probes read the plan's group at its taps, and its drafts are chains of whole blocks."""
    rt = Runtime.load(smollm2_export.folder)
    prompts = ["Permission is hereby granted, free of charge, to any person obtaining"]
    plain = rt.generate(prompts, 24, stop_tokens=[])
    draft = _subset_draft(rt, smollm2_export, tmp_path, (0, 1), 3, True)
    spec = rt.generate(prompts, 24, stop_tokens=[], strategy="speculative", draft=draft, search=True, profile=True)
    assert spec.tokens == plain.tokens and spec.extra["probes"] > 0 and spec.extra["depths_scored"]
    singles = {name for name in spec.timings_ms if name.startswith("layer_")}
    assert singles <= {"layer_00", "layer_01"}, singles  # the blocks from depth 2 on are groups
