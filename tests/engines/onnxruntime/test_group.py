"""Layer groups: runs of consecutive in-place layers as one ONNX Runtime session give the tokens single layers give."""
import pytest
import torch

from dlexport.engines.onnxruntime.group import runs
from dlexport.runtime import Runtime
from dlexport.runtime.plan import Draft, ExitPolicy, Plan

PROMPTS = [list(range(5, 40)), list(range(60, 80))]  # a left-padded batch of two


@pytest.fixture(scope="module")
def pair(tiny_llama_export):
    return Runtime.load(tiny_llama_export.folder), Runtime.load(tiny_llama_export.folder, groups=False)


def _groups(rt):
    return sorted(name for name in rt.engines if name.startswith("layers_"))


def test_full_depth_runs_as_one_group_and_leaves_the_single_layers_unopened(pair):
    grouped, single = pair
    assert _groups(grouped) == ["layers_00-03"] and _groups(single) == []
    out = grouped.generate(PROMPTS, 12, stop_tokens=[], profile=True)
    assert out.tokens == single.generate(PROMPTS, 12, stop_tokens=[]).tokens
    assert set(out.timings_ms) == {"embed", "layers_00-03", "head"}
    assert all(grouped.engines[f"layer_{i:02d}"]._session is None for i in range(4))


def test_a_plans_runs_get_their_own_groups(pair):
    grouped, single = pair
    plan = Plan.skip(grouped.manifest, [0, 1, 3])
    out = grouped.generate(PROMPTS, 12, plan, stop_tokens=[], profile=True)
    assert out.tokens == single.generate(PROMPTS, 12, plan, stop_tokens=[]).tokens
    assert "layers_00-01" in _groups(grouped) and set(out.timings_ms) == {"embed", "layers_00-01", "layer_03", "head"}


def test_an_exit_check_inside_a_run_splits_it(pair):
    grouped, single = pair
    plan = Plan.skip(grouped.manifest, range(4), exit=ExitPolicy((1,), "top1_prob", 0.05, 0))
    a, b = grouped.generate(PROMPTS[:1], 16, plan, stop_tokens=[]), single.generate(PROMPTS[:1], 16, plan, stop_tokens=[])
    assert a.tokens == b.tokens and [s.exit_layer for s in a.steps] == [s.exit_layer for s in b.steps]
    assert any(s.exit_layer == 1 for s in a.steps), "the threshold should let some tokens exit"


def test_speculative_greedy_on_groups_equals_plain(pair):
    grouped, _ = pair
    plain = grouped.generate(PROMPTS, 16, stop_tokens=[])
    spec = grouped.generate(PROMPTS, 16, stop_tokens=[], strategy="speculative",
                          draft=Draft((0, 1), 3, False))
    assert spec.tokens == plain.tokens and spec.extra["drafted"] > 0


def test_a_groups_taps_are_the_hidden_states_between_its_layers(pair):
    """A shadow probe reads the plan's hidden state at a depth from one group call instead of splitting it."""
    taps, timings = [], []
    for rt in pair:
        cache = rt.new_cache(range(4), 1, 8)
        cache.valid[:] = True
        seg, times = rt.embed(torch.tensor([[5, 6, 7]]), torch.arange(3)[None]), {}
        tapped = dict.fromkeys((1, 2, 3))
        rt.run_layers(seg, list(range(4)), cache, taps=tapped, timings=times)
        taps.append({d: h.clone() for d, h in tapped.items()})
        timings.append(set(times) - {"embed"})
    assert timings == [{"layers_00-03"}, {"layer_00", "layer_01", "layer_02", "layer_03"}]
    for d in (1, 2, 3):
        torch.testing.assert_close(taps[0][d], taps[1][d], atol=1e-5, rtol=1e-4)


def test_portable_layers_are_never_grouped(tiny_llama_portable_export):
    assert _groups(Runtime.load(tiny_llama_portable_export.folder)) == []


def test_runs_split_at_gaps(tiny_llama_export):
    assert runs(tiny_llama_export) == [[0, 1, 2, 3]]
    assert runs(tiny_llama_export, [0, 1, 3]) == [[0, 1]]


def test_a_group_is_composed_once_into_the_cache_with_external_weights(tiny_llama_export, tmp_path, monkeypatch):
    monkeypatch.setenv("DLEXPORT_CACHE", str(tmp_path))
    Runtime.load(tiny_llama_export.folder)
    (folder,) = (tmp_path / "groups").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["group.onnx", "group.onnx.data"]
    layers = sum(tiny_llama_export.subgraph(f"layer_{i:02d}")["files"][0]["size"] for i in range(4))
    assert (folder / "group.onnx").stat().st_size < 0.3 * layers < 0.6 * layers < (folder / "group.onnx.data").stat().st_size
    stamp = (folder / "group.onnx.data").stat().st_mtime_ns
    Runtime.load(tiny_llama_export.folder)  # the second load reuses it
    assert (folder / "group.onnx.data").stat().st_mtime_ns == stamp and len(list((tmp_path / "groups").iterdir())) == 1


def test_an_unwritable_cache_leaves_the_layers_single(tiny_llama_export, tmp_path, monkeypatch):
    (tmp_path / "groups").write_text("not a folder")
    monkeypatch.setenv("DLEXPORT_CACHE", str(tmp_path))
    rt = Runtime.load(tiny_llama_export.folder)
    assert _groups(rt) == [] and rt.generate(PROMPTS, 4, stop_tokens=[]).new_tokens == 4


def test_gemma3_groups_are_its_runs_of_local_layers(family_export):
    manifest = family_export("tiny-gemma3")
    windows = manifest.arch["layer_windows"]
    groups = runs(manifest)
    assert groups and all(len({windows[i] for i in g}) == 1 for g in groups)
    grouped, single = Runtime.load(manifest.folder), Runtime.load(manifest.folder, groups=False)
    assert _groups(grouped) and grouped.generate(PROMPTS, 12, stop_tokens=[]).tokens == \
        single.generate(PROMPTS, 12, stop_tokens=[]).tokens
