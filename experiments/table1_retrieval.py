"""`python -m experiments.table1_retrieval --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("table1_retrieval"))
