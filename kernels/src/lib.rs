//! CUDA kernel sources (filled by the CUDA backend issue).
