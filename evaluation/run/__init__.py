"""One run: config schemas and composition, the stream, checkpoints, metrics, results, loggers, the run folder."""
