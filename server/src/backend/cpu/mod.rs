//! CPU backend: the f32 reference every other backend is checked against.
