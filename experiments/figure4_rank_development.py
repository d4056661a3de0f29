"""`python -m experiments.figure4_rank_development --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("figure4_rank_development"))
