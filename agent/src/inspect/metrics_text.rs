//! Parsing the agent's `/metrics` text (Prometheus / OpenMetrics exposition).

/// One series of the metrics text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A metrics text that does not parse: where, and what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {problem}: {text:?}")]
pub struct BadMetricsText {
    pub line: usize,
    pub text: String,
    pub problem: Problem,
}

/// What was wrong with one line of a metrics text.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("text after # EOF")]
    AfterEof,
    #[error("not a HELP, TYPE or UNIT line")]
    Comment,
    #[error("unknown metric type")]
    Type,
    #[error("no value")]
    NoValue,
    #[error("bad metric name {0:?}")]
    Name(String),
    #[error("bad label")]
    Label,
    #[error("bad label name {0:?}")]
    LabelName(String),
    #[error("bad escape in a label value")]
    Escape,
    #[error("unterminated label value")]
    Unterminated,
    #[error("no space before the value")]
    NoSpace,
    #[error("bad value {0:?}")]
    Value(String),
    #[error("bad timestamp {0:?}")]
    Timestamp(String),
}

/// Parses Prometheus / OpenMetrics text exposition, refusing anything that
/// is not a comment (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`) or a sample
/// `name{label="value",…} number`.
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>, BadMetricsText> {
    let mut samples = Vec::new();
    let mut ended = false;
    for (number, line) in text.lines().enumerate() {
        let at = |problem| BadMetricsText {
            line: number + 1,
            text: line.to_owned(),
            problem,
        };
        if ended {
            return Err(at(Problem::AfterEof));
        }
        if line == "# EOF" {
            ended = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            if !matches!(kind, "HELP" | "TYPE" | "UNIT") || !is_metric_name(name) {
                return Err(at(Problem::Comment));
            }
            if kind == "TYPE"
                && !matches!(
                    words.next().unwrap_or(""),
                    "counter"
                        | "gauge"
                        | "histogram"
                        | "gaugehistogram"
                        | "summary"
                        | "info"
                        | "stateset"
                        | "unknown"
                        | "untyped"
                )
            {
                return Err(at(Problem::Type));
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        samples.push(parse_sample(line).map_err(at)?);
    }
    Ok(samples)
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<Sample, Problem> {
    let name_end = line.find(['{', ' ']).ok_or(Problem::NoValue)?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(Problem::Name(name.to_owned()));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = inner.split_once("=\"").ok_or(Problem::Label)?;
            if !is_metric_name(label) || label.contains(':') {
                return Err(Problem::LabelName(label.to_owned()));
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        _ => return Err(Problem::Escape),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => return Err(Problem::Unterminated),
                }
            };
            labels.push((label.to_owned(), value));
            inner = &after[end + 1..];
            inner = inner.strip_prefix(',').unwrap_or(inner);
        }
    }
    let mut fields = rest.strip_prefix(' ').ok_or(Problem::NoSpace)?.split(' ');
    let value = fields.next().unwrap_or("");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => value
            .parse()
            .map_err(|_| Problem::Value(value.to_owned()))?,
    };
    // An optional timestamp may follow.
    if let Some(timestamp) = fields.next()
        && timestamp.parse::<f64>().is_err()
    {
        return Err(Problem::Timestamp(timestamp.to_owned()));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}
