"""Reading finished runs: tables, figures, the paper's numbers, saved-run reports."""
