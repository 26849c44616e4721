//! gateway.yaml: schema, loading (file + `TOLLGATE_` environment), validation.
//!
//! A config is either fully valid or rejected with every problem listed as
//! `file: key.path: what was expected`; a running gateway keeps its old config
//! when a reload is rejected.

mod mqtt;
mod schema;
mod target;
mod tunnel;
pub mod units;
mod validate;
mod wamp;
pub mod watch;

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Yaml};

pub use mqtt::*;
pub use schema::*;
pub use target::{TargetHost, TargetUrl};
pub use tunnel::*;
pub use wamp::*;

/// Environment variables with this prefix override file keys; `__` separates
/// levels: `TOLLGATE_ADMIN__BIND=0.0.0.0:9090`.
pub const ENV_PREFIX: &str = "TOLLGATE_";

/// Our own variables that share the prefix but are not config keys.
const ENV_NOT_KEYS: &[&str] = &["CONFIG", "LOG", "LOG_FORMAT"];

/// One problem, located by key path (`routes[1].upstream.timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if e.path.is_empty() {
                write!(f, "{}: {}", self.file.display(), e.message)?;
            } else {
                write!(f, "{}: {}: {}", self.file.display(), e.path, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    pub fn new(file: &Path, errors: Vec<ConfigError>) -> ConfigErrors {
        ConfigErrors {
            file: file.to_owned(),
            errors,
        }
    }

    /// `Err` when there is any problem.
    pub fn check(file: &Path, errors: Vec<ConfigError>) -> Result<(), ConfigErrors> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors::new(file, errors))
        }
    }
}

/// Reads, merges with the environment and validates a config file.
pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
    let config = parse(file)?;
    ConfigErrors::check(file, validate::validate(&config))?;
    Ok(config)
}

/// Whether a config file holds no settings at all: empty, only comments,
/// or an empty mapping (what an editor's truncating save leaves for a
/// moment). Unreadable or malformed files are not empty: loading them
/// says what is wrong.
pub fn is_empty_document(file: &Path) -> bool {
    match Figment::new()
        .merge(Yaml::file_exact(file))
        .extract::<serde_json::Value>()
    {
        Ok(serde_json::Value::Null) => true,
        Ok(serde_json::Value::Object(m)) => m.is_empty(),
        _ => false,
    }
}

/// How a reload ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Applied,
    Unchanged,
}

/// The semantic problems of a parsed config (what [`load`] rejects).
pub fn problems(config: &Config) -> Vec<ConfigError> {
    validate::validate(config)
}

fn figment(file: &Path) -> Figment {
    Figment::new()
        .merge(Yaml::file_exact(file))
        .merge(Env::prefixed(ENV_PREFIX).ignore(ENV_NOT_KEYS).split("__"))
}

/// The config file with its environment overrides as written (no
/// defaults), with every secret-bearing value replaced: `GET /admin/config`.
pub fn redacted(file: &Path) -> Result<serde_json::Value, String> {
    let mut v: serde_json::Value = figment(file).extract().map_err(|e| e.to_string())?;
    fn redact(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m.iter_mut() {
                    if k.contains("secret")
                        || k.contains("token_sha256")
                        || k.contains("password")
                        || k == "key"
                    {
                        *v = serde_json::Value::String("<redacted>".into());
                    } else {
                        redact(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
            _ => {}
        }
    }
    redact(&mut v);
    Ok(v)
}

/// Reads and merges a config file with the environment, without the
/// semantic checks.
pub fn parse(file: &Path) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors::new(file, errors);
    if let Err(e) = std::fs::metadata(file) {
        return Err(fail(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read the config file: {e}"),
        }]));
    }
    let mut config: Config = figment(file).extract().map_err(|e| fail(from_figment(e)))?;
    config.base_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(config)
}

fn from_figment(err: figment::Error) -> Vec<ConfigError> {
    err.into_iter()
        .map(|e| {
            let mut path = String::new();
            for key in &e.path {
                if key.parse::<usize>().is_ok() {
                    path.push_str(&format!("[{key}]"));
                } else {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
            }
            let mut message = describe(&e.kind);
            if let Some(md) = &e.metadata
                && md.name.contains("environment")
            {
                message.push_str(&format!(" (from environment variable {ENV_PREFIX}…)"));
            }
            ConfigError { path, message }
        })
        .collect()
}

fn describe(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::UnknownField(field, expected) => {
            format!(
                "unknown key `{field}`; expected one of: {}",
                expected.join(", ")
            )
        }
        Kind::MissingField(field) => format!("missing required key `{field}`"),
        Kind::UnknownVariant(found, expected) => {
            format!(
                "unknown value `{found}`; expected one of: {}",
                expected.join(", ")
            )
        }
        other => other.to_string(),
    }
}

/// Where the config comes from: `-c`, then `$TOLLGATE_CONFIG` (both via the CLI),
/// then `./gateway.yaml`, then `config/gateway.yaml`.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let candidates = [Path::new("gateway.yaml"), Path::new("config/gateway.yaml")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.to_path_buf())
        .ok_or_else(|| {
            "no config file: pass -c FILE, set TOLLGATE_CONFIG, or create ./gateway.yaml or ./config/gateway.yaml"
                .to_owned()
        })
}

/// `/bar/` and `/bar` match the same requests; `/` stays `/`.
pub fn normalize_prefix(prefix: &str) -> &str {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() { "/" } else { trimmed }
}
