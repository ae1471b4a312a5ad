"""The threads sweep: one worker process per thread count, every entry in every round, same tokens everywhere."""
from __future__ import annotations

import pytest

from dlexport.runtime import Plan
from dlexport.tools.sweep import markdown, run_sweep


def test_sweep_runs_every_entry_at_every_count(tiny_llama_export):
    plan = Plan.skip(tiny_llama_export, [0, 2], name="half")
    sweep = run_sweep(tiny_llama_export.folder, [1, 2], [plan], prompt_tokens=8, new_tokens=4, repeats=2,
                      prompt_count=1, warmup=0, log=lambda *a: None)
    rows = {(r["threads"], r["run"]): r for r in sweep["results"]}
    assert set(rows) == {(1, "full"), (1, "half"), (2, "full"), (2, "half")}
    assert all(r["same_tokens_as_first_count"] for r in rows.values())  # thread count never changes the output
    assert rows[(1, "half")]["layers_per_token"] == 2 and rows[(2, "full")]["layers_per_token"] == 4
    assert all(len(r["per_round_tokens_per_s"]) == 2 for r in rows.values())
    assert rows[(1, "full")]["vs_full_at_1"] == 1.0
    assert "| half | 2 | 2.0 |" in markdown(sweep)


def test_sweep_refuses_repeated_counts(tiny_llama_export):
    with pytest.raises(ValueError, match="distinct thread counts"):
        run_sweep(tiny_llama_export.folder, [2, 2], [], log=lambda *a: None)
