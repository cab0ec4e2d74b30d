//! Fault-injecting wrapper (placeholder).
