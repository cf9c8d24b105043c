//! CUDA backend (cudarc with dynamic loading).
