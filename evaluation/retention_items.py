"""``python -m evaluation.retention_items diff RUN_A RUN_B`` / ``rescore RUN``: per-example retention
outputs compared or scored again (evaluation.reporting.retention_items)."""
from evaluation.reporting.retention_items import main

if __name__ == "__main__":
    main()
