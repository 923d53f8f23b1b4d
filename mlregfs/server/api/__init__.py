"""The REST and GraphQL APIs of the embedded server, one module per API area."""
