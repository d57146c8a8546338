"""``python -m evaluation.tables``: the command that regenerates the paper's tables and figures
(evaluation.reporting.tables)."""
from evaluation.reporting.tables import main

if __name__ == "__main__":
    raise SystemExit(main())
