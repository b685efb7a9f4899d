"""Operations: the web dashboard, the operator gRPC API and the federation's keys."""
