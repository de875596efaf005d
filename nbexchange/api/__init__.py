"""The HTTP API: one module per REST resource."""
