//! The agent's logs: the `tracing` subscriber installed at start (text or
//! JSON on stderr, with the `log` bridge aya-log writes through), and the
//! handle that replaces its filter at runtime (`/logging` on the admin endpoint).

use std::sync::{Mutex, OnceLock};

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, clap::Args, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogArgs {
    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info,ferry_agent=debug`).
    #[arg(long = "log-level", env = "FERRY_LOG", default_value = "info")]
    pub filter: String,
    #[arg(long = "log-format", env = "FERRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Why the log filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("no logger installed")]
    NoLogger,
    #[error("{filter:?} is not a log filter: {source}")]
    Invalid {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot change the log filter: {0}")]
    Reload(#[from] tracing_subscriber::reload::Error),
}

/// The installed subscriber's filter: its text, and a way to replace it.
struct Control {
    current: Mutex<String>,
    reload: Box<dyn Fn(EnvFilter) -> Result<(), tracing_subscriber::reload::Error> + Send + Sync>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

impl LogArgs {
    /// Installs the global `tracing` subscriber; from then on [`set_filter`]
    /// can change what it lets through.
    pub fn init(&self) -> anyhow::Result<()> {
        let filter = parse_filter(&self.filter)
            .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", self.filter))?;
        use std::io::IsTerminal as _;
        // The filter goes last: a reload handle is only offered for the finished layer stack.
        let builder = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        let result = match self.format {
            LogFormat::Text => {
                let builder = builder.with_env_filter(filter).with_filter_reloading();
                let handle = builder.reload_handle();
                self.keep_control(move |filter| handle.reload(filter));
                builder.try_init()
            }
            LogFormat::Json => {
                let builder = builder
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_env_filter(filter)
                    .with_filter_reloading();
                let handle = builder.reload_handle();
                self.keep_control(move |filter| handle.reload(filter));
                builder.try_init()
            }
        };
        result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
    }

    fn keep_control(
        &self,
        reload: impl Fn(EnvFilter) -> Result<(), tracing_subscriber::reload::Error>
        + Send
        + Sync
        + 'static,
    ) {
        let _ = CONTROL.set(Control {
            current: Mutex::new(self.filter.clone()),
            reload: Box::new(reload),
        });
    }
}

/// A filter in EnvFilter syntax, with span field values matched as written
/// (`[{path=/ready}]`), never as regular expressions: the admin endpoint
/// takes filters from anyone on the node's loopback, and compiling the
/// regular expression of a 286-byte filter the fuzzer found
/// (`fuzz/seeds/admin_request/field-pattern-dfa`) took 6.6 s of CPU.
/// tracing-subscriber's own advice for filters from untrusted input.
fn parse_filter(text: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    EnvFilter::builder().with_regex(false).parse(text)
}

/// The filter in force, if a logger is installed.
pub fn current_filter() -> Option<String> {
    let control = CONTROL.get()?;
    Some(control.current.lock().expect("log filter lock").clone())
}

/// Replaces the filter (EnvFilter syntax, e.g. `info,ferry_agent::tunnel=debug`);
/// a filter that does not parse leaves the old one in force.
pub fn set_filter(filter: &str) -> Result<(), FilterError> {
    let control = CONTROL.get().ok_or(FilterError::NoLogger)?;
    let parsed = parse_filter(filter).map_err(|source| FilterError::Invalid {
        filter: filter.to_owned(),
        source,
    })?;
    (control.reload)(parsed)?;
    *control.current.lock().expect("log filter lock") = filter.to_owned();
    tracing::info!(filter = %ferry_proto::Untrusted(filter), "log filter changed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_filter;

    /// The fuzzer's `admin_request` timeout: a field pattern that, as a
    /// regular expression, took seconds to compile. Read literally, it is
    /// just a value to compare with.
    #[test]
    fn a_field_value_in_a_filter_is_literal_not_a_regular_expression() {
        // Not a regular expression at all: refused when values were ones.
        assert!(parse_filter("info,ferry_agent[{path=(}]=debug").is_ok());
        let found = format!(
            "info06C_r[{{erng?Lv=leeitfo%fe;g~{}P{}vvvv475A777{}}}]",
            "v".repeat(14),
            ".".repeat(78),
            "v".repeat(14)
        );
        assert!(parse_filter(&found).is_ok());
        // The rest of the syntax is as before.
        assert!(parse_filter("warn,ferry_agent::tunnel=debug").is_ok());
        assert!(parse_filter("ferry_agent=nonsense").is_err());
    }
}
