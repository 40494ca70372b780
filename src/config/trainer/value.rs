//! The small vocabulary the trainer's sections are parsed with: [`Pos`] (an integer ≥ 1),
//! [`split_kind`] for the `{kind: ..., ...}` sections, and [`de`], which types a YAML value and
//! names the full key path (`model.hidden[1]`) in its error. Each refusal is the config's one
//! [`ConfigError`] and says what was found and what is accepted.

use std::fmt;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_yaml::{Mapping, Value};

use crate::config::ConfigError;

/// A trainer key refused: its path and what is wrong with it (the config's one error).
pub(super) fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::at(key, message)
}

/// An integer ≥ 1 (errors say "expected a positive integer" and what was found).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Pos(pub u64);

impl<'de> Deserialize<'de> for Pos {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Pos, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Pos;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a positive integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Pos, E> {
                if v == 0 {
                    return Err(E::invalid_value(de::Unexpected::Unsigned(0), &self));
                }
                Ok(Pos(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Pos, E> {
                if v <= 0 {
                    return Err(E::invalid_value(de::Unexpected::Signed(v), &self));
                }
                Ok(Pos(v as u64))
            }
        }
        d.deserialize_u64(V)
    }
}

/// Split a `{kind: ..., ...}` mapping into its kind (one of `accepted`) and the other keys.
pub(super) fn split_kind(
    key: &str,
    v: &Value,
    accepted: &[&str],
) -> Result<(String, Value), ConfigError> {
    let list = accepted.join(", ");
    let Value::Mapping(m) = v else {
        return Err(err(
            key,
            format!(
                "expected a mapping such as {{kind: {}, ...}}, found {}",
                accepted[0],
                found(v)
            ),
        ));
    };
    let kind = match m.get("kind") {
        None => {
            return Err(err(
                format!("{key}.kind"),
                format!("missing; accepted: {list}"),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(err(
                format!("{key}.kind"),
                format!("expected one of {list}, found {}", found(other)),
            ))
        }
    };
    if !accepted.contains(&kind.as_str()) {
        return Err(err(
            format!("{key}.kind"),
            format!("unknown kind {kind:?}; accepted: {list}"),
        ));
    }
    let mut rest = Mapping::new();
    for (k, val) in m {
        if k.as_str() != Some("kind") {
            rest.insert(k.clone(), val.clone());
        }
    }
    Ok((kind, Value::Mapping(rest)))
}

/// Deserialize `v` as `T`, naming `key` + the inner path in errors.
pub(in crate::config) fn de<T: DeserializeOwned>(key: &str, v: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let full = if path == "." || path.is_empty() {
            key.to_owned()
        } else if path.starts_with('[') {
            format!("{key}{path}")
        } else {
            format!("{key}.{path}")
        };
        err(full, inner)
    })
}

/// A short description of a YAML value for errors.
pub(super) fn found(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

/// `key` as an integer ≥ 1 (or absent).
pub(super) fn positive(key: &str, v: Option<u64>) -> Result<Option<u64>, ConfigError> {
    match v {
        Some(0) => Err(err(key, "expected a positive integer, found 0")),
        other => Ok(other),
    }
}
