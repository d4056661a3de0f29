"""`python -m experiments.table4_minimal_circuit --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("table4_minimal_circuit"))
