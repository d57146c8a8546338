"""The kit every editing method builds on: the Editor interface, model loading, encoding, forwards, routing queries."""
