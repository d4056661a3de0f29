"""`python -m experiments.stage_robustness --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("stage_robustness"))
