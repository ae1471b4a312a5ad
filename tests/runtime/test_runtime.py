"""The stitched runtime against PyTorch: full model vs HF generate, skip plans and exit policies vs the reference."""
from __future__ import annotations

import shutil

import pytest

from dlexport.validation import hf_greedy
from dlexport.runtime import Plan, PlanError, PromptTooLongError, Runtime, Sampling
from dlexport.runtime.plan import ExitPolicy
from dlexport.runtime.reference import reference_generate

PROMPTS = [[5, 17, 301, 44, 9, 120, 77], [250, 3, 88]]


@pytest.fixture(scope="module", params=["tiny_opt_export", "tiny_opt_portable_export"], ids=["inplace", "portable"])
def opt_runtime(request):
    """tiny OPT through both KV flavours: every exactness test below holds for each."""
    return Runtime.load(request.getfixturevalue(request.param).folder)


@pytest.fixture(scope="module")
def smollm2_runtime(smollm2_export):
    return Runtime.load(smollm2_export.folder)


def _greedy(runtime, prompts, n, plan=None):
    return runtime.generate(prompts, n, plan, stop_tokens=[])


def test_full_model_matches_hf_generate_for_a_left_padded_batch(opt_runtime, tiny_opt_model):
    out = _greedy(opt_runtime, PROMPTS, 16)
    assert out.tokens == [hf_greedy(tiny_opt_model.model, p, 16) for p in PROMPTS]
    assert out.mean_layers == 4 and all(s.exit_layer is None for s in out.steps)


def test_skip_plan_matches_the_pytorch_reference(opt_runtime, tiny_opt_model, tiny_opt_export):
    plan = Plan.skip(tiny_opt_export, [0, 2, 3])
    out = _greedy(opt_runtime, PROMPTS, 12, plan)
    ref, _ = reference_generate(tiny_opt_model.model, PROMPTS, 12, plan)
    assert out.tokens == ref
    assert out.tokens != _greedy(opt_runtime, PROMPTS, 12).tokens  # skipping a layer changes this model's output
    assert out.mean_layers == 3


def _exit_plan(manifest, layers, exit_layers, threshold, criterion="top1_prob", min_depth=0):
    return Plan.skip(manifest, layers, exit=ExitPolicy(tuple(exit_layers), criterion, threshold, min_depth))


def test_exit_policy_matches_the_pytorch_reference(opt_runtime, tiny_opt_model, tiny_opt_export):
    prompt = [PROMPTS[0]]
    # a threshold in the middle of the observed scores, so that some tokens exit and some do not
    plan = _exit_plan(tiny_opt_export, range(4), [0, 1, 2], 0.1)
    ref, ref_exits = reference_generate(tiny_opt_model.model, prompt, 24, plan)
    out = _greedy(opt_runtime, prompt, 24, plan)
    assert out.tokens == ref
    assert [s.exit_layer for s in out.steps] == ref_exits
    fired = [e for e in ref_exits if e is not None]
    assert 0 < len(fired) < len(ref_exits) - 1, "the threshold should make some tokens exit and not others"
    assert out.mean_layers < 4


def test_threshold_that_never_fires_gives_the_full_models_tokens(opt_runtime, tiny_opt_export):
    plan = _exit_plan(tiny_opt_export, range(4), [0, 1, 2], 1.0, criterion="gap")
    out = _greedy(opt_runtime, PROMPTS, 16, plan)
    assert out.tokens == _greedy(opt_runtime, PROMPTS, 16).tokens
    assert all(s.exit_layer is None and s.layers_executed == 4 for s in out.steps)


def test_sampling_is_seeded_and_top_k_1_is_greedy(opt_runtime):
    def sample(seed, **kw):
        return opt_runtime.generate(PROMPTS, 12, sampling=Sampling(temperature=1.0, seed=seed, **kw),
                                    stop_tokens=[]).tokens
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, top_k=1) == _greedy(opt_runtime, PROMPTS, 12).tokens
    assert sample(4, top_p=1e-6) == _greedy(opt_runtime, PROMPTS, 12).tokens


def test_stop_tokens_end_each_row(opt_runtime):
    full = _greedy(opt_runtime, [PROMPTS[0]], 12).tokens[0]
    stop = full[4]
    out = opt_runtime.generate([PROMPTS[0]], 12, stop_tokens=[stop])
    assert out.tokens[0] == full[:full.index(stop) + 1]


def test_stream_yields_one_event_per_token(opt_runtime):
    events = list(opt_runtime.stream(PROMPTS, 6, stop_tokens=[]))
    assert [e.index for e in events[:-1]] == list(range(1, 7))
    assert [[e.tokens[b] for e in events[:-1]] for b in range(2)] == events[-1].result.tokens


def test_prompt_longer_than_the_context_is_refused(opt_runtime):
    with pytest.raises(PromptTooLongError, match="300 tokens but the model.s context is 256: shorten it"):
        opt_runtime.generate([[5] * 300], 4)
    with pytest.raises(PromptTooLongError, match="lower max_new_tokens"):
        opt_runtime.generate([[5] * 200], 100)


def test_plan_for_another_model_is_refused(opt_runtime, tiny_llama_export):
    with pytest.raises(PlanError, match="made for model"):
        opt_runtime.generate(PROMPTS, 4, Plan.skip(tiny_llama_export, [0, 1]))


def test_missing_and_corrupt_subgraph_files(tiny_opt_export, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_opt_export.folder, broken)
    (broken / "layers" / "layer_01.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="layer_01.onnx is missing.*dlexport export"):
        Runtime.load(broken)
    shutil.copy(tiny_opt_export.folder / "layers" / "layer_01.onnx", broken / "layers" / "layer_01.onnx")
    with open(broken / "head.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 16)
    with pytest.raises(ValueError, match="head.onnx does not match its manifest.*corrupt"):
        Runtime.load(broken)
    shutil.copy(tiny_opt_export.folder / "head.onnx", broken / "head.onnx")
    assert Runtime.load(broken).generate(PROMPTS, 2, stop_tokens=[]).new_tokens == 2  # restored files load again


def test_layers_not_loaded_are_refused_with_the_fix(tiny_opt_export):
    runtime = Runtime.load(tiny_opt_export.folder, layers=[0, 2])
    assert runtime.generate(PROMPTS, 4, Plan.skip(tiny_opt_export, [0, 2]), stop_tokens=[]).mean_layers == 2
    with pytest.raises(ValueError, match=r"runs layers \[1, 3\], which this runtime did not load"):
        runtime.generate(PROMPTS, 4)


# -- the real model ---------------------------------------------------------------------------------------------
TEXT = "The GNU General Public License is a free, copyleft license for software and other kinds of works."


def test_smollm2_validated_end_to_end(smollm2_export):
    v = smollm2_export.data["validation"]
    assert v["ok"] and v["end_to_end"]["result"] == "match" and len(v["end_to_end"]["runtime"]) == 32


def test_smollm2_skip_plan_matches_reference(smollm2_runtime, smollm2_model, smollm2_export):
    prompt = smollm2_runtime.tokenizer(TEXT)["input_ids"]
    plan = Plan.skip(smollm2_export, [i for i in range(30) if i not in (5, 11, 17, 23, 26)])
    out = _greedy(smollm2_runtime, [prompt], 16, plan)
    ref, _ = reference_generate(smollm2_model.model, [prompt], 16, plan)
    assert out.tokens == ref and out.mean_layers == 25


def test_smollm2_exit_policy_matches_reference(smollm2_runtime, smollm2_model, smollm2_export):
    prompt = smollm2_runtime.tokenizer(TEXT)["input_ids"]
    plan = _exit_plan(smollm2_export, range(30), [20, 24, 27], 0.6, min_depth=20)
    out = _greedy(smollm2_runtime, [prompt], 16, plan)
    ref, ref_exits = reference_generate(smollm2_model.model, [prompt], 16, plan)
    assert out.tokens == ref and [s.exit_layer for s in out.steps] == ref_exits
    assert any(e is not None for e in ref_exits)


def test_smollm2_left_padded_batch_equals_each_prompt_alone(smollm2_runtime):
    prompts = [TEXT, "Once upon a time, in a small village,"]
    batch = smollm2_runtime.generate(prompts, 8, stop_tokens=[])
    assert batch.tokens == [smollm2_runtime.generate([p], 8, stop_tokens=[]).tokens[0] for p in prompts]
    assert all(text.strip() for text in batch.texts)
