import json

import pytest

from dlexport.plans.calibrate import calibrate_skip, target_depth
from dlexport.runtime import Runtime, load_plan


def test_skip_plan_records_fingerprint_ladder_and_metrics(tiny_opt_export, tiny_opt_model, small_text, tmp_path):
    out = tmp_path / "plan.json"
    plan = calibrate_skip(tiny_opt_export.folder, out, target_layers=3, text=small_text, loaded=tiny_opt_model,
                          progress=False, log=lambda *a: None)
    loaded = load_plan(out, tiny_opt_export)
    assert loaded.layers == plan.layers and len(loaded.layers) == 3
    assert loaded.fingerprint == tiny_opt_export.fingerprint
    assert [len(r) for r in loaded.ladder] == [1, 2, 3, 4] and loaded.ladder[2] == loaded.layers
    held = loaded.calibration["held_out"]
    assert set(held) == {"full", "greedy", "even"} and held["greedy"]["tokens"] > 0
    assert len(loaded.calibration["calibration_split"]["steps"]) == 3
    runtime = Runtime.load(tiny_opt_export.folder)
    result = runtime.generate([[5, 6, 7]], 4, loaded)
    assert all(s.layers_executed == 3 for s in result.steps[1:])


def test_interrupted_calibration_resumes_from_its_journal(tiny_opt_export, tiny_opt_model, small_text, tmp_path):
    out = tmp_path / "plan.json"
    journal = tmp_path / ".plan.json.progress.json"

    def stop_after_two(step, seen=[]):
        seen.append(step)
        if len(seen) == 2:
            raise KeyboardInterrupt

    kw = dict(target_fraction=0.5, text=small_text, loaded=tiny_opt_model, progress=False, log=lambda *a: None,
              rescore=0)
    with pytest.raises(KeyboardInterrupt):
        calibrate_skip(tiny_opt_export.folder, out, on_step=stop_after_two, **kw)
    assert not out.exists() and len(json.loads(journal.read_text())["steps"]) == 2

    resumed_steps = []
    resumed = calibrate_skip(tiny_opt_export.folder, out, on_step=resumed_steps.append, **kw)
    assert len(resumed_steps) == 1  # only the step that was not finished is scored again
    assert not journal.exists()
    fresh = calibrate_skip(tiny_opt_export.folder, tmp_path / "fresh.json", **kw)
    assert resumed.ladder == fresh.ladder


def test_target_depth_errors():
    assert target_depth(30, None, 0.8) == 24
    with pytest.raises(ValueError, match="exactly one"):
        target_depth(30, 24, 0.8)
    with pytest.raises(ValueError, match="outside 1..30"):
        target_depth(30, 31, None)


@pytest.mark.slow
def test_smollm2_greedy_beats_even_spacing_on_held_out_text(smollm2_export, smollm2_model, tmp_path):
    from dlexport.plans.calibrate import TextConfig

    plan = calibrate_skip(smollm2_export.folder, tmp_path / "plan.json", target_layers=24, rescore=4,
                          text=TextConfig(seq_len=64, calib_seqs=4, eval_seqs=8), loaded=smollm2_model,
                          progress=False, log=lambda *a: None)
    held = plan.calibration["held_out"]
    assert held["greedy"]["ppl"] < 0.5 * held["even"]["ppl"]
    assert held["greedy"]["agreement"] > held["even"]["agreement"]
