//! nbds3: a Network Block Device server whose devices live in S3-compatible object storage
//! as a log of immutable, compressed, checksummed segments and versioned manifests.
//!
//! Layers, each seeing only the one below it (see `../shared/DESIGN.md` and `format/`):
//! `nbd` (wire protocol) → `volume` (dirty set, page cache) → `log` (segments, manifests,
//! index, fencing, compaction) → `store` (object-store backends). `background` runs the
//! log's maintenance CPU work at the lowest priority; `memory` returns freed heap memory.

pub mod background;
pub mod cli;
pub mod format;
pub mod inspect;
pub mod log;
pub mod memory;
pub mod nbd;
pub mod store;
pub mod util;
pub mod volume;
