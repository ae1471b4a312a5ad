"""The command line: every refusal is one line on stderr and a non-zero exit, never a traceback (--debug shows it)."""
from __future__ import annotations

import argparse
import json

import pytest

from dlexport.cli import main, running
from dlexport.runtime.plan import Draft


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "0"], "max_new_tokens is 0"),
    (["--max-new-tokens", "-3"], "max_new_tokens is -3"),
    (["--temperature", "-1"], "temperature is -1.0"),
    (["--temperature", "1", "--top-p", "nan"], "top_p is nan"),
    (["--strategy", "speculative", "--draft-layers", "0-1", "--draft-k", "-2"], "draft k"),
    (["--threads", "0"], "threads must be a whole number >= 1"),
    (["--strategy", "speculative", "--draft-layers", "1,3", "--search-budget", "2"], "skip-set search budget"),
    (["--strategy", "speculative", "--draft-layers", "1,3", "--lookup", "-1"], "lookup (the n-gram"),
])
def test_run_refusals_are_one_line(tiny_opt_export, capsys, extra, message):
    assert main(["run", str(tiny_opt_export.folder), "--prompt", "hi"] + extra) == 2
    assert message in _error_line(capsys)


@pytest.mark.parametrize("flags, search, lookup", [([], None, 0), (["--search-budget", "0.5"], 0.5, 0),
                                                   (["--no-search", "--lookup", "3"], False, 3)])
def test_search_flags_reach_the_strategy(flags, search, lookup):
    parser = argparse.ArgumentParser()
    running.register(parser.add_subparsers())
    args = parser.parse_args(["run", "x", "--prompt", "p", "--strategy", "speculative", "--draft-layers", "1,3",
                              *flags])
    assert running._strategy_options(args, None) == {"draft": Draft((1, 3), 4, True), "search": search,
                                                     "lookup": lookup}


def test_a_plan_that_is_a_folder(tiny_opt_export, capsys, tmp_path):
    folder = str(tiny_opt_export.folder)
    assert main(["run", folder, "--plan", str(tmp_path), "--prompt", "x"]) == 2
    assert "is a folder, not a file" in _error_line(capsys)


def test_plan_refusals_name_the_file(tiny_opt_export, capsys, tmp_path):
    plan = tmp_path / "plan.json"
    base = {"format": "dlexport-plan", "model": {"fingerprint": tiny_opt_export.fingerprint, "num_layers": 4}}
    for data, message in [({**base, "version": "1"}, "the string '1' is not supported"),
                          ({**base, "version": 1, "layers": [0] * 100_000}, "the limit is 1024"),
                          ({**base, "version": 1, "name": "x" * 5_000_000}, "'name' is 5000000 characters")]:
        plan.write_text(json.dumps(data))
        assert main(["run", str(tiny_opt_export.folder), "--plan", str(plan), "--prompt", "x"]) == 2
        line = _error_line(capsys)
        assert message in line and str(plan) in line and len(line) < 1024


def test_debug_shows_the_traceback(tiny_opt_export):
    with pytest.raises(ValueError, match="max_new_tokens"):
        main(["--debug", "run", str(tiny_opt_export.folder), "--prompt", "x", "--max-new-tokens", "0"])


def test_inspect_takes_an_engine_folder(tiny_opt_export, tmp_path, capsys):
    assert main(["build", "--from-export", str(tiny_opt_export.folder), "--out", str(tmp_path / "e"),
                 "--backend", "onnxruntime", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "e")]) == 0
    assert capsys.readouterr().out.startswith(f"engine folder {tmp_path / 'e'}")


def test_ctrl_c_says_resume_only_where_a_command_resumes(tiny_opt_export, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(running, "_run", interrupted)
    monkeypatch.setattr("dlexport.pipeline.export", interrupted)
    assert main(["run", str(tiny_opt_export.folder), "--prompt", "x"]) == 130
    assert "resume" not in capsys.readouterr().err
    assert main(["export", "--out", "/nonexistent/x"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys, tiny_opt_export):
    def bug(args):
        raise KeyError("oops")

    monkeypatch.setattr(running, "_run", bug)
    assert main(["run", str(tiny_opt_export.folder), "--prompt", "x"]) == 1
    assert "unexpected KeyError" in _error_line(capsys)


def test_analyze_speculation_alone(tiny_opt_export, tmp_path, capsys):
    args = ["analyze", str(tiny_opt_export.folder), "--only", "speculation", "--seq-len", "32", "--calib-seqs", "6",
            "--eval-seqs", "6", "--adapter-seqs", "8", "--no-progress", "-o", str(tmp_path / "r")]
    assert main(args + ["--draft-budget", "-1"]) == 2
    assert "--draft-budget" in _error_line(capsys)
    assert main(args + ["--draft-budget", "1", "--no-measure"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["speculation"]["measured"] is None and report["recommendation"] == [report["speculation"]["verdict"]]
