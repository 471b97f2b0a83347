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
    #[error(
        "{filter:?} filters on span fields (`[{{field=value}}]`), which the agent does not \
         accept: filter by target, span name and level"
    )]
    FieldFilter { filter: String },
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
        let filter = parse_filter(&self.filter).map_err(|e| anyhow::anyhow!("--log-level: {e}"))?;
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

/// A filter in EnvFilter syntax, without span field filters
/// (`[{path=/ready}]`): the admin endpoint takes filters from anyone on the
/// node's loopback, and the `admin_request` fuzz target found two ways
/// field filters go wrong inside tracing-subscriber. Compiling a 286-byte
/// one's value as a regular expression took 6.6 s of CPU
/// (`fuzz/seeds/admin_request/field-pattern-dfa`), and with values read
/// literally instead, two different field filters can compare equal, which
/// its debug assertions refuse. Targets, span names and levels are what
/// operators change at runtime.
fn parse_filter(text: &str) -> Result<EnvFilter, FilterError> {
    if text.contains('{') {
        return Err(FilterError::FieldFilter {
            filter: text.to_owned(),
        });
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(text)
        .map_err(|source| FilterError::Invalid {
            filter: text.to_owned(),
            source,
        })
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
    let parsed = parse_filter(filter)?;
    (control.reload)(parsed)?;
    *control.current.lock().expect("log filter lock") = filter.to_owned();
    tracing::info!(filter = %ferry_proto::Untrusted(filter), "log filter changed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{FilterError, parse_filter};

    /// The fuzzer's `admin_request` finds: a field filter whose value
    /// took seconds to compile as a regular expression, and field filters
    /// that tracing-subscriber's ordering calls equal when they are not.
    #[test]
    fn a_filter_on_span_fields_is_refused_by_name() {
        let found = format!(
            "info06C_r[{{erng?Lv=leeitfo%fe;g~{}P{}vvvv475A777{}}}]",
            "v".repeat(14),
            ".".repeat(78),
            "v".repeat(14)
        );
        for filter in [found.as_str(), "nus[{lc$e+s}],fgn_s[{l_n[fe{lc$}]"] {
            let error = parse_filter(filter).unwrap_err();
            assert!(matches!(error, FilterError::FieldFilter { .. }), "{error}");
            assert!(error.to_string().contains("span fields"), "{error}");
        }
        // Targets, span names and levels are as before.
        assert!(parse_filter("warn,ferry_agent::tunnel=debug").is_ok());
        assert!(parse_filter("info,ferry_agent[connection]=debug").is_ok());
        assert!(matches!(
            parse_filter("ferry_agent=nonsense"),
            Err(FilterError::Invalid { .. })
        ));
    }
}
