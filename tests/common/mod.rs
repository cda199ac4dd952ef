//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use katz_onnx::runtime::SessionOptions;

/// The repository: `KATZ_REPO` where the test binary runs elsewhere (the GPU host).
pub fn root() -> PathBuf {
    std::env::var_os("KATZ_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// One test body for every device: KATZ_TEST_DEVICE=cuda:0 runs it on the GPU.
pub fn test_options() -> SessionOptions {
    let device = std::env::var("KATZ_TEST_DEVICE")
        .ok()
        .map(|d| d.parse().expect("KATZ_TEST_DEVICE"))
        .unwrap_or_default();
    SessionOptions {
        intra_threads: 1,
        device,
    }
}
