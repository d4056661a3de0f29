"""`python -m experiments.table5_crattn_docid_share --run DIR`: that experiment alone on a reproduce folder."""

from experiments import main

if __name__ == "__main__":
    raise SystemExit(main("table5_crattn_docid_share"))
