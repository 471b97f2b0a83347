//! The admin endpoint's routing (`admin::route`): a request's method, path
//! and query, as anything on the node's loopback may send them, including
//! `POST /logging?level=<filter>`, which replaces the global log filter
//! (`percent_decode`d). The logger is installed once, filtering everything
//! out, and put back to that after every input.
//!
//! Input: a byte picking the method (of [`METHODS`]), then the request
//! target (`/path?query`, as the request line carries it).
//!
//! What must hold: `POST /logging` with a non-empty `level` either answers
//! 200, and the filter in force is then exactly the level, decoded here
//! without the agent's decoder, or answers 400 with a message and leaves
//! the filter as it was (always, for a filter on span fields, `{`);
//! without a level, 400; `GET /logging` shows the
//! filter in force. Any other method is refused (405); a `GET` reaches the
//! page its path names, or a 404 that names the path. Every answer is
//! plain text that says something. `percent_decode` reads every escape as
//! the reference decoder here does, and percent-encoding every byte of a
//! string, then decoding, gives the string back.

#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use ferry_agent::{
    admin::{LOGGING_PATH, Page, Route, percent_decode, route},
    logging::{self, LogArgs, LogFormat},
};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "FERRY",
];

/// The filter the fuzzer runs with: nothing is logged.
const QUIET: &str = "off";

fuzz_target!(|data: &[u8]| {
    let Some((&first, target)) = data.split_first() else {
        return;
    };
    decoding(target);
    let method: Method = METHODS[usize::from(first) % METHODS.len()]
        .parse()
        .expect("METHODS are methods");
    // What hyper would refuse before routing never reaches it.
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    logger();
    let request = Request::builder()
        .method(method.clone())
        .uri(uri.clone())
        .body(())
        .expect("a method and a URI make a request");
    let routed = route(&request);
    let path = uri.path();
    match routed {
        Route::Page(page) => {
            assert_eq!(method, Method::GET, "{method} reached {page:?}");
            assert_eq!(page.path(), path, "{path} reached {page:?}");
        }
        Route::Answer(answer) => {
            let (status, body) = read(answer);
            assert!(!body.trim().is_empty(), "{status} says nothing");
            if path == LOGGING_PATH && method == Method::POST {
                set_level(&uri, status, &body);
            } else if path == LOGGING_PATH && method == Method::GET {
                assert_eq!(status, StatusCode::OK);
                assert_eq!(Some(body), logging::current_filter().map(|f| f + "\n"));
            } else if method != Method::GET {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            } else {
                assert!(
                    Page::ALL.iter().all(|page| page.path() != path),
                    "{path} is a page, but {status}"
                );
                assert_eq!(status, StatusCode::NOT_FOUND, "GET {path}");
                assert!(body.contains(path), "the 404 {body:?} names {path}");
            }
        }
    }
    if logging::current_filter().as_deref() != Some(QUIET) {
        logging::set_filter(QUIET).expect("the quiet filter is a filter");
    }
});

/// What `POST /logging?<query>` must have done.
fn set_level(uri: &Uri, status: StatusCode, body: &str) {
    let level = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("level="))
        .map(|escaped| reference_decode(escaped.as_bytes()));
    let filter = logging::current_filter().expect("the logger is installed");
    match level.filter(|level| !level.is_empty()) {
        None => {
            assert_eq!(status, StatusCode::BAD_REQUEST, "no level in {uri}");
            assert_eq!(filter, QUIET, "no level, yet the filter changed");
        }
        Some(level) if status == StatusCode::OK => {
            assert!(
                !level.contains('{'),
                "{level:?} filters on span fields, yet was taken"
            );
            assert_eq!(filter, level, "{uri} set another filter");
            assert_eq!(body, format!("log filter is now {level}\n"));
        }
        Some(level) => {
            assert_eq!(status, StatusCode::BAD_REQUEST, "{level:?}: {body}");
            assert_eq!(
                filter, QUIET,
                "{level:?} was refused, yet the filter changed"
            );
        }
    }
}

fn decoding(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    assert_eq!(
        percent_decode(&text),
        reference_decode(text.as_bytes()),
        "decoding {text:?}"
    );
    // Every byte escaped, in either case of hex digit.
    let escaped: String = text
        .bytes()
        .enumerate()
        .map(|(i, b)| {
            if i % 2 == 0 {
                format!("%{b:02X}")
            } else {
                format!("%{b:02x}")
            }
        })
        .collect();
    assert_eq!(
        percent_decode(&escaped),
        text,
        "round trip through {escaped}"
    );
}

/// `%XX` (two hex digits) is the byte XX; everything else is itself; the
/// bytes are read as UTF-8, invalid sequences replaced.
fn reference_decode(bytes: &[u8]) -> String {
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some((&b, tail)) = rest.split_first() {
        match (b, hex(tail.first()), hex(tail.get(1))) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                rest = &tail[2..];
            }
            _ => {
                out.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read(answer: Response<Full<Bytes>>) -> (StatusCode, String) {
    let status = answer.status();
    let content_type = answer.headers().get(http::header::CONTENT_TYPE);
    assert_eq!(
        content_type.map(|v| v.as_bytes()),
        Some(&b"text/plain; charset=utf-8"[..]),
        "{status} is not plain text"
    );
    let body = runtime()
        .block_on(answer.into_body().collect())
        .expect("a full body is there")
        .to_bytes();
    let body = String::from_utf8(body.to_vec()).expect("the answer is UTF-8");
    (status, body)
}

/// The agent's logger, with nothing let through, installed once.
fn logger() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        LogArgs {
            filter: QUIET.to_owned(),
            format: LogFormat::Text,
        }
        .init()
        .expect("the logger installs once");
    });
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}
