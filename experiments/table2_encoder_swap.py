"""`python -m experiments.table2_encoder_swap --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("table2_encoder_swap"))
