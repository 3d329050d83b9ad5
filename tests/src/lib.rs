//! Component and end-to-end tests for Colony live in `tests/tests/`.
