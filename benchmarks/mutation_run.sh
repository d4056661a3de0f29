#!/usr/bin/env bash
# Mutation run (issue 24, class 12) over a module that computes research numbers, with mutmut 2.5.1
# (`pip install mutmut==2.5.1`; mutmut 3's copy-into-mutants/ model was not tried). Time-boxed: mutmut 2
# tests mutants in file order and keeps its results in .mutmut-cache (git-ignored), so an interrupted run
# resumes where it stopped; `mutmut results` / `mutmut show ID` list the survivors AFTER the run (do not
# call them while it runs: they rewrite the cache and crashed a run here).
#
#   benchmarks/mutation_run.sh                 # genir_jax/interp/rank_window.py (default)
#   benchmarks/mutation_run.sh metrics         # genir_jax/interp/metrics.py
#   TIME_BOX=1200 benchmarks/mutation_run.sh   # stop after 20 minutes (default 1800 s)
#
# What it mutates and which tests kill the mutants (fast tests only, `-x -m "not slow"`):
#   rank_window -> genir_jax/interp/rank_window.py, tests/interp/test_rank_window.py minus the two sweep
#                  tests (`-k "not sweep"`: they build and sweep a T5 and take ~30 s, ~25 s left per mutant)
#   metrics     -> genir_jax/interp/metrics.py, tests/interp/test_metrics.py
# mutmut 2 mutates the file IN PLACE (a .bak beside it while a mutant is tested): run it in a clean
# checkout and do not edit the module or its tests while it runs; after an interrupt, check
# `git status` (restore with `git checkout -- <module>` and remove a left-over `<module>.bak`).
#
# Measured (2-core CPU machine shared with other jobs, 2026-12-07), rank_window.py, before the two tests
# test_a_single_undecided_row_... and test_the_default_capacity_... were added: 133 mutants; a 22.4-minute
# time box tested 120 of them: 88 killed, 32 survived, 0 timed out (kill rate 73% of those tried); ~10 s
# per mutant. Most survivors are equivalent (axis=+1 on 2-D arrays, tuning constants, conservative margins).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-rank_window}"
case "$target" in
  rank_window) module=genir_jax/interp/rank_window.py
               tests='tests/interp/test_rank_window.py -k "not sweep"' ;;
  metrics)     module=genir_jax/interp/metrics.py
               tests='tests/interp/test_metrics.py' ;;
  *) echo "unknown target: $target (rank_window | metrics)" >&2; exit 2 ;;
esac
start=$(date +%s)
status=0
timeout --signal=INT "${TIME_BOX:-1800}" mutmut run --paths-to-mutate "$module" --tests-dir tests/interp \
  --runner "python -m pytest -x -q -p no:cacheprovider -m \"not slow\" $tests" || status=$?
echo "mutmut run exit status $status after $(( $(date +%s) - start )) s"
# an interrupt can leave the module mutated: put it back
if [ -f "$module.bak" ]; then mv "$module.bak" "$module"; fi
git diff --quiet -- "$module" || { echo "restoring $module" >&2; git checkout -- "$module"; }
mutmut results || true
