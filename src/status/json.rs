//! The JSON rendering of a [`StatusReport`] (`status --json`): the report's types serialized as
//! they are, schema [`SCHEMA`].

use super::{StatusReport, SCHEMA};

/// The report as pretty-printed JSON (its `schema` field is [`SCHEMA`]).
pub fn render_json(r: &StatusReport) -> serde_json::Result<String> {
    debug_assert_eq!(r.schema, SCHEMA);
    serde_json::to_string_pretty(r)
}
