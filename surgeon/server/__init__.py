"""The surgeon gRPC server (`surgeon serve`): surgeon.v1.Surgeon over the same library functions as the CLI.

Stubs generated from proto/surgeon/v1/surgeon.proto live in surgeon/v1 (`python -m surgeon.server.codegen`)."""
