//! `hpc-ckpt status`: what happened to a run and what is safe on disk, for a person (text) or a
//! program (`--json`, schema `hpc-ckpt-status/1`, documented in the README).
//!
//! One report model, gathered once, then rendered (as cargo-nextest's reporters share one event
//! stream):
//! - [`report`]: the report's types — the model, and as serialized the JSON schema;
//! - [`gather`]: reads the run dir into a report ([`inspect`]), read-only: it never takes the
//!   lock, removes temp entries or moves the pointer;
//! - [`warnings`]: what in the report a person should act on;
//! - [`text`] and [`json`]: the two renderings ([`render_text`], [`render_json`]).

pub mod gather;
pub mod json;
pub mod report;
pub mod text;
pub mod warnings;

pub use gather::{chain_of, inspect};
pub use json::render_json;
pub use report::*;
pub use text::{human_bytes, render_text};
