"""Serving a finished run: the gRPC InferenceService."""
