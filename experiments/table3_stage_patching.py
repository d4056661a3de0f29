"""`python -m experiments.table3_stage_patching --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("table3_stage_patching"))
