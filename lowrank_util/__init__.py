"""The bottom of lowrank: file helpers, the user-error types and their command-line handling, the
peak-memory meter. It imports nothing else of this project, so encoders and data sets load without
Triton (the dependency order is in docs/design.md §2)."""
