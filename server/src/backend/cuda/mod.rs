//! CUDA backend (cudarc with dynamic loading).

pub mod nccl;
