"""Wall time of one skip-set trial (two sets x 8 positions) against a plain step, on SmolLM2 (TRIAL_EXTRA).

    python benchmarks/speculative-2026-12-02b/trialcost.py EXPORT PLAN   # PLAN from `dlexport plan calibrate-draft`
"""
import sys, time, torch
from dlexport.runtime import Runtime, Plan, load_plan
from dlexport.runtime import speculative as S
from dlexport.runtime.plan import Draft
from dlexport.tools.prompts import prose_prompts
torch.set_num_threads(1)
EXPORT, PLAN = sys.argv[1:3]
rt = Runtime.load(EXPORT, threads=1)
plan = load_plan(PLAN, rt.manifest)
from dataclasses import replace
draft = replace(plan.draft, layers=tuple(plan.calibration["best_skip_set"]["layers"]), k=4)
full = Plan.full(rt.manifest)
times = {"trial": [], "step": []}
orig_trial, orig_step = S.Speculative._trial, S.Strategy.step
def trial(self, state):
    t = time.perf_counter(); orig_trial(self, state); times["trial"].append(time.perf_counter() - t)
def step(self, state):
    t = time.perf_counter(); r = orig_step(self, state); times["step"].append(time.perf_counter() - t); return r
S.Speculative._trial, S.Strategy.step = trial, step
for p in [p["ids"] for p in prose_prompts(12, 32, rt.tokenizer)]:
    rt.generate([p], 40, full, stop_tokens=[], strategy="speculative", draft=draft, search=1.0, memory=False)
import statistics as st
sp = st.median(times["step"]); tr = st.median(times["trial"])
print(f"plain step {sp*1e3:.2f} ms, trial {tr*1e3:.2f} ms = {tr/sp:.2f} steps; trials {len(times['trial'])}")
