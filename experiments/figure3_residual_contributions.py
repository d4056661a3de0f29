"""`python -m experiments.figure3_residual_contributions --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("figure3_residual_contributions"))
