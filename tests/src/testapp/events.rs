//! What `ferry-testapp` prints: one JSON object per line, each with an
//! `"event"` naming which of these types the rest of the line is. The
//! binary prints them with [`line()`] and the harness reads them with
//! [`parse`], so both sides share one definition of each line.

use std::net::SocketAddr;

use anyhow::Context as _;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// One kind of line `ferry-testapp` prints.
pub trait Event: Serialize + DeserializeOwned {
    /// The line's `"event"`.
    const NAME: &'static str;
}

/// `serve` listens (on TCP, and with `--udp` on UDP too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listening {
    pub addr: SocketAddr,
}

/// `connect` or `hold` has its connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    /// The connection's `getpeername`: what the client believes it reached.
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// `connect` finished one connection: it sent `sent` bytes of stream A and
/// `received` came back, `intact` if that is all of stream B and in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub sent: u64,
    pub received: u64,
    pub intact: bool,
}

/// `connect` (without `--quiet`): one connection failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub to: SocketAddr,
    pub error: String,
}

/// `connect --quiet`: its only line, at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub connections: u64,
    pub failed: u64,
}

/// `serve` finished one connection: `received` bytes of stream A arrived
/// (`intact` if all of it, in order, and the answer went out), and it sent
/// `sent` bytes of stream B back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    /// Who connected: the client pod, or the agent that carried the connection.
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub received: u64,
    pub intact: bool,
    pub sent: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `serve --reset` read stream A and aborted the connection; `ok` if the
/// socket took the zero linger that makes the close an RST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    pub peer: SocketAddr,
    pub ok: bool,
}

/// `serve --udp` echoed a datagram of `bytes` from `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datagram {
    pub from: SocketAddr,
    pub bytes: usize,
}

/// `udp`'s one line: whether the probe came back from `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpEcho {
    pub peer: SocketAddr,
    pub echoed: bool,
}

/// `hold` was released and closed its connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {}

/// `hold`'s connection ended before it was released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    pub peer: SocketAddr,
    pub how: String,
}

macro_rules! events {
    ($($event:ty => $name:literal),* $(,)?) => {
        $(impl Event for $event {
            const NAME: &'static str = $name;
        })*
    };
}

events! {
    Listening => "listening",
    Connected => "connected",
    Done => "done",
    Failed => "failed",
    Summary => "summary",
    Served => "served",
    Reset => "reset",
    Datagram => "datagram",
    UdpEcho => "udp",
    Closed => "closed",
    Ended => "ended",
}

/// The line `ferry-testapp` prints for `event` (without the newline).
pub fn line<E: Event>(event: &E) -> String {
    let mut value = serde_json::to_value(event).expect("events are plain structs");
    if let Value::Object(fields) = &mut value {
        fields.insert("event".to_owned(), E::NAME.into());
    }
    value.to_string()
}

/// `line` as an `E`: `None` if it is another event (or no event), an error
/// if it says it is an `E` but is not one.
pub fn parse<E: Event>(line: &Value) -> Option<anyhow::Result<E>> {
    (line["event"] == E::NAME).then(|| {
        serde_json::from_value(line.clone()).with_context(|| {
            format!(
                "ferry-testapp printed a {} line the harness cannot read: {line}",
                E::NAME
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_its_event_and_reads_back() {
        let served = Served {
            peer: "198.18.1.1:40000".parse().unwrap(),
            local: "198.18.1.2:8080".parse().unwrap(),
            received: 5,
            intact: true,
            sent: 7,
            error: None,
        };
        let text = line(&served);
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["event"], "served");
        assert_eq!(value["peer"], "198.18.1.1:40000");
        assert!(value.get("error").is_none(), "{text}");
        assert_eq!(parse::<Served>(&value).unwrap().unwrap(), served);
        assert!(parse::<Done>(&value).is_none());
        assert_eq!(
            line(&Closed {}),
            r#"{"event":"closed"}"#,
            "an event without fields"
        );
    }

    #[test]
    fn a_line_that_is_not_what_it_says_is_an_error() {
        let value: Value = serde_json::from_str(r#"{"event":"done","peer":"x"}"#).unwrap();
        let error = parse::<Done>(&value).unwrap().unwrap_err();
        assert!(format!("{error:#}").contains("cannot read"), "{error:#}");
    }
}
