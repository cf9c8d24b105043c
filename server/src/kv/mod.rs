//! The shared on-demand KV block pool and the prefix cache.
