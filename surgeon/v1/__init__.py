"""Generated gRPC stubs of proto/surgeon/v1/surgeon.proto (`python -m surgeon.server.codegen`): do not edit."""
