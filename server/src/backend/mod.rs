//! Compute backends behind one trait: `cpu` (reference, f32) and `cuda`.
pub mod cpu;
pub mod cuda;
