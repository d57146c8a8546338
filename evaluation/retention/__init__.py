"""Test-retention suite of Gu et al. 2024: eight general-ability tasks scored as its authors score them."""
from evaluation.retention.suite import (
    TASK_NAMES,
    Gu2024Suite,
    NoRetention,
    RetentionReport,
)

__all__ = ["TASK_NAMES", "Gu2024Suite", "NoRetention", "RetentionReport"]
