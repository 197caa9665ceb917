"""The gRPC surface: request validation, servicers, and the mapping of refusals to rich errors."""
