"""Skip plans, early exit and speculation on models with sliding-window layers, whichever kind of layer is skipped:
the stitched runtime against the cache-free PyTorch reference and against plain decoding."""
from __future__ import annotations

import pytest

from dlexport.exporter import load_model
from dlexport.runtime import Plan, Runtime
from dlexport.runtime.plan import Draft, ExitPolicy
from dlexport.runtime.reference import reference_generate

PROMPTS = [[5, 17, 301, 44, 9, 120, 77], [250, 3, 88]]
NEW_TOKENS = 16
# tiny-gemma3's layers: local, global, local, local, global; every tiny-mistral layer is local
SKIPS = {"tiny-gemma3": {"global": (0, 2, 3, 4), "local": (0, 1, 3, 4), "both": (0, 2, 4)},
         "tiny-mistral": {"local": (0, 2, 3), "two": (1, 3)}}
CASES = [(shape, kind) for shape, kinds in SKIPS.items() for kind in kinds]


@pytest.fixture(scope="module")
def setup(family_export):
    made = {}

    def get(shape):
        if shape not in made:
            manifest = family_export(shape)
            made[shape] = (manifest, Runtime.load(manifest.folder), load_model(shape, random_weights=True).model)
        return made[shape]

    return get


def _greedy(rt, prompts, plan=None, **kw):
    return rt.generate(prompts, NEW_TOKENS, plan, stop_tokens=[], **kw)


@pytest.mark.parametrize("shape,kind", CASES)
def test_skip_plan_equals_the_reference(setup, shape, kind):
    manifest, rt, model = setup(shape)
    plan = Plan.skip(manifest, SKIPS[shape][kind])
    out = _greedy(rt, PROMPTS, plan)
    assert out.tokens == reference_generate(model, PROMPTS, NEW_TOKENS, plan)[0]
    assert out.tokens != _greedy(rt, PROMPTS).tokens  # the skip changes the output, so the check means something


def _firing_exit_plan(manifest, model, layers, exit_layers):
    """An exit plan whose threshold (read off the reference) lets some tokens exit and not others."""
    for threshold in (0.9, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.003, 0.002):
        plan = Plan.skip(manifest, layers, exit=ExitPolicy(tuple(exit_layers), "top1_prob", threshold, 0))
        ref, exits = reference_generate(model, [PROMPTS[0]], NEW_TOKENS, plan)
        fired = sum(e is not None for e in exits)
        if 0 < fired < len(exits) - 1:
            return plan, ref, exits
    pytest.fail("no threshold made only some tokens exit")


@pytest.mark.parametrize("shape", list(SKIPS))
def test_early_exit_equals_the_reference(setup, shape):
    manifest, rt, model = setup(shape)
    n = manifest.num_layers
    plan, ref, exits = _firing_exit_plan(manifest, model, range(n), range(n - 1))
    out = _greedy(rt, [PROMPTS[0]], plan)
    assert out.tokens == ref and [s.exit_layer for s in out.steps] == exits
    exited_kinds = {manifest.arch["layer_windows"][e] for e in exits if e is not None}
    assert exited_kinds == ({4, None} if shape == "tiny-gemma3" else {4})  # tokens left after local and global layers


def test_gemma3_early_exit_after_both_kinds_with_a_skip_plan(setup):
    manifest, rt, model = setup("tiny-gemma3")
    plan, ref, exits = _firing_exit_plan(manifest, model, (0, 1, 2, 4), (0, 1, 2))
    assert _greedy(rt, [PROMPTS[0]], plan).tokens == ref


@pytest.mark.parametrize("shape,draft", [("tiny-gemma3", (0,)), ("tiny-gemma3", (0, 1)), ("tiny-gemma3", (1, 3)),
                                         ("tiny-mistral", (0,)), ("tiny-mistral", (0, 2))])
def test_speculative_greedy_equals_plain_greedy(setup, shape, draft):
    manifest, rt, _ = setup(shape)
    plain = _greedy(rt, PROMPTS)
    for k in (1, 3):
        spec = _greedy(rt, PROMPTS, Plan.full(manifest), strategy="speculative", draft=Draft(draft, k, False))
        assert spec.tokens == plain.tokens, (draft, k)
        assert spec.extra["drafted"] > 0


# -- the real Gemma 3 270M (its first 6 layers: 5 local with a window of 512, then a global one) -------------------
LONG_TEXT = " ".join(f"{i} times {i} is {i * i}." for i in range(1, 120))  # ~1000 tokens, past the window


@pytest.fixture(scope="module")
def gemma3(gemma3_270m_export, gemma3_270m_model):
    rt = Runtime.load(gemma3_270m_export.folder)
    return gemma3_270m_export, rt, gemma3_270m_model


@pytest.mark.slow
def test_gemma3_270m_prompt_past_the_window_equals_hf_generate(gemma3):
    from dlexport.validation import hf_greedy

    manifest, rt, loaded = gemma3
    prompt = loaded.tokenizer(LONG_TEXT)["input_ids"]
    assert len(prompt) > 2 * manifest.arch["layer_windows"][0]
    expected = hf_greedy(loaded.model, prompt, 6)
    assert _greedy_n(rt, prompt, 6) == expected
    rt.windows = [None] * manifest.num_layers  # the windows bite: global masks everywhere give other tokens
    try:
        assert _greedy_n(rt, prompt, 6) != expected
    finally:
        rt.windows = manifest.arch["layer_windows"]


@pytest.mark.slow
@pytest.mark.parametrize("skip", [5, 2], ids=["global", "local"])
def test_gemma3_270m_skip_plan_equals_the_reference(gemma3, skip):
    manifest, rt, loaded = gemma3
    prompt = loaded.tokenizer("The GNU General Public License is a free, copyleft license for")["input_ids"]
    plan = Plan.skip(manifest, [i for i in range(manifest.num_layers) if i != skip])
    out = rt.generate([prompt], 8, plan, stop_tokens=[])
    assert out.tokens == reference_generate(loaded.model, [prompt], 8, plan)[0]


def _greedy_n(rt, prompt, n):
    return rt.generate([prompt], n, stop_tokens=[]).tokens[0]
