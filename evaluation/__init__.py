"""The harness around the editors: model loading, the lifelong stream, metrics, logging."""
