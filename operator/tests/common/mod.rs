#![allow(dead_code)]
pub mod schema;

use std::path::PathBuf;

/// The repository root (operator/..).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
