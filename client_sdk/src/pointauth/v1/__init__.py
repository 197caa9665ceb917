"""Generated protobuf and gRPC code of pointauth.v1."""
