//! The modules compiled into Pitcher. Each file is one module; this list
//! gives them their names (and their shared on/off flag, by position:
//! append, never reorder, so a flag keeps its meaning across an upgrade).

pub mod access_log;
mod degrade;
mod headers;
mod quota;
mod statsd;
mod throttle;
mod trace;

pub use degrade::{Controller, DegradeSettings};

use super::{Registration, SettingsError};

/// Every module compiled in; a module's position is its shared flag.
pub static REGISTRY: &[Registration] = &[
    // access_log still reports its errors as text.
    Registration { name: "access_log", build: |c, b| access_log::build(c, b).map_err(SettingsError::from) },
    Registration { name: "headers", build: headers::build },
    Registration { name: "throttle", build: throttle::build },
    Registration { name: "quota", build: quota::build },
    Registration { name: "degrade", build: degrade::build },
    Registration { name: "trace", build: trace::build },
    Registration { name: "statsd", build: statsd::build },
];

/// Deserializes a module's settings table into its typed form, with the
/// unknown keys refused.
pub(crate) fn settings<T: serde::de::DeserializeOwned>(t: &toml::Table) -> Result<T, SettingsError> {
    toml::Value::Table(t.clone())
        .try_into()
        .map_err(|e: toml::de::Error| SettingsError::Table { message: e.message().to_string() })
}

/// Refuses a setting over its bound (the caller's error is prefixed with
/// the file, the line and the module's table).
pub(crate) fn at_most(name: &'static str, value: u64, max: u64) -> Result<(), SettingsError> {
    if value > max {
        return Err(SettingsError::OverLimit { name, value, max });
    }
    Ok(())
}

/// A fleet-capable module's own settings error, with the fleet keys named
/// among those accepted (the module's parser knows only its own).
pub(crate) fn mention_fleet_keys(e: SettingsError) -> SettingsError {
    match e {
        SettingsError::Table { message } if message.starts_with("unknown field") => SettingsError::Table {
            message: format!("{message}, or one of the fleet keys {:?}", crate::fleet::FLEET_KEYS),
        },
        other => other,
    }
}
