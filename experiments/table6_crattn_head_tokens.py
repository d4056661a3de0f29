"""`python -m experiments.table6_crattn_head_tokens --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("table6_crattn_head_tokens"))
