//! The one config error: where a value came from (the file, or the flag that set it), its key
//! path (`checkpoint.keep_last`, `model.hidden[1]`), and what is wrong with it — the value found
//! and what is accepted. Every part of the config, the built-in trainer's keys and the sbatch
//! renderer refuse a value with it; `hpc-ckpt` maps it to exit code `CONFIG`.
//!
//! Layered the way ripgrep's `ignore::Error` is: a part reports the key and the message
//! ([`ConfigError::at`]), and the caller who knows the file adds it ([`ConfigError::in_file`]).

use std::fmt;

/// A refused config value. Displays as `FILE: KEY: MESSAGE`, each of the first two left out
/// where it is not known (a whole-file error has no key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the value came from, or the flag that set it (`--ranks`); `None` until known.
    pub file: Option<String>,
    /// The key path; empty for an error about the file as a whole (unreadable, not YAML).
    pub key: String,
    /// What is wrong: the value found and what is accepted.
    pub message: String,
}

impl ConfigError {
    /// `key` refused: `message` says the value and what is accepted.
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: None,
            key: key.into(),
            message: message.into(),
        }
    }

    /// An error about the file (or a flag) as a whole.
    pub fn whole(message: impl Into<String>) -> ConfigError {
        ConfigError::at("", message)
    }

    /// Name the file (or flag) the value came from, unless one is named already.
    pub fn in_file(mut self, file: impl fmt::Display) -> ConfigError {
        self.file.get_or_insert_with(|| file.to_string());
        self
    }

    /// Prefix the key path with the section it was found in (`checkpoint` + `keep_last`).
    pub fn under(mut self, section: &str) -> ConfigError {
        self.key = match self.key.as_str() {
            "" => section.to_owned(),
            k => format!("{section}.{k}"),
        };
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_file_key_and_message_each_where_known() {
        assert_eq!(ConfigError::at("a.b", "bad").to_string(), "a.b: bad");
        assert_eq!(ConfigError::whole("bad").to_string(), "bad");
        let e = ConfigError::at("b", "bad").under("a").in_file("job.yaml");
        assert_eq!(e.to_string(), "job.yaml: a.b: bad");
        assert_eq!(e.in_file("other").file.as_deref(), Some("job.yaml"));
    }
}
