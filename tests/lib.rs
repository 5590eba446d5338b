//! End-to-end suite spanning both binaries; see `e2e/`.
