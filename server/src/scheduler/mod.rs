//! Continuous batching: decides each step's batch (rank 0 only).
