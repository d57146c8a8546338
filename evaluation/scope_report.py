"""``python -m evaluation.scope_report RUN``: which inputs a finished run's router treats as edited
(evaluation.reporting.scope_report)."""
from evaluation.reporting.scope_report import main

if __name__ == "__main__":
    main()
