"""`python -m experiments.figure5_reading --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("figure5_reading"))
