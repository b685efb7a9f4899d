"""The federation: the Flower ServerApp, the per-domain expert strategy, aggregation,
robustness, privacy, secure aggregation and the run store."""
