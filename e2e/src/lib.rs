//! Helpers shared by the multi-process end-to-end scenarios under `e2e/tests/`.
