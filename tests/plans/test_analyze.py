import json

from dlexport.plans.analyze import analyze


def test_analyze_writes_report_on_tiny_opt(tiny_opt_export, tiny_opt_model, small_text, tmp_path):
    report = analyze(tiny_opt_export.folder, tmp_path, text=small_text, adapter_seqs=8, oracle_prompts=4,
                     prompt_tokens=8, new_tokens=6, draft_budget_s=1.0, measure_prompts=2, measure_tokens=6,
                     loaded=tiny_opt_model, progress=False, log=lambda *a: None)
    for name in ("report.md", "report.json", "analyze.png"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["layers"] for r in data["skip"]] == [4, 3, 2, 1]
    assert data["recommendation"] and data["oracle"]["prompts"] == 4
    assert "## Recommendation" in (tmp_path / "report.md").read_text()
    assert report["full"]["agreement"] == 1.0
    spec = data["speculation"]
    assert [r["text"] for r in spec["kinds"]] == ["prose", "repetitive"] and spec["measured"]["identical"]
    assert spec["verdict"] in data["recommendation"] and "## Self-speculation" in (tmp_path / "report.md").read_text()
