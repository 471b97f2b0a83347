//! What `ferry-agent inspect` reads back from the admin endpoint: the
//! HTTP/1.1 response (`inspect::client::parse_response`, with `dechunk` for
//! a chunked body) and the `/metrics` text (`inspect::parse_metrics`).
//! Whatever listens on the admin port answers them, so they must take any
//! bytes.
//!
//! Input: a mode byte, then
//! - 0: a whole response, as read from the socket;
//! - 1: chunk sizes, 0xFF, and a body (UTF-8): the body, chunked here by a
//!   reference encoder with those sizes (cycled), is decoded again;
//! - 2: a metrics text.
//!
//! What must hold: no panic on any input; a response is accepted only with
//! a status line whose second word is its status, and a body that is not
//! chunked is given as it is; a body chunked by the reference encoder (in
//! any hex case, with or without chunk extensions) dechunks to itself, in
//! a response too; metrics rendered from the samples of a parsed text (by
//! the renderer here) parse to the same samples.

#![no_main]

use ferry_agent::inspect::{
    Sample,
    client::{dechunk, parse_response},
    parse_metrics,
};
use ferry_fuzz::{HEADER_END, assert_message, split_mode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data, 3) else {
        return;
    };
    match mode {
        0 => response(rest),
        1 => chunked(rest),
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                metrics(text);
            }
        }
    }
});

fn response(bytes: &[u8]) {
    let (status, body) = match parse_response(bytes) {
        Ok(parsed) => parsed,
        Err(error) => {
            assert_message(&error.to_string(), &error);
            return;
        }
    };
    let text = String::from_utf8_lossy(bytes);
    let (head, raw_body) = text
        .split_once("\r\n\r\n")
        .expect("an accepted response has a head");
    let status_line = head.lines().next().unwrap_or("");
    assert_eq!(
        status_line.split_whitespace().nth(1).map(str::parse::<u16>),
        Some(Ok(status)),
        "{status} is not the status of {status_line:?}"
    );
    let chunked = head.to_ascii_lowercase().contains("chunked");
    if !chunked {
        assert_eq!(
            body, raw_body,
            "a body that is not chunked is given as it is"
        );
    }
}

fn chunked(input: &[u8]) {
    let (sizes, body) = match input.iter().position(|&b| b == HEADER_END) {
        Some(end) => (&input[..end], &input[end + 1..]),
        None => (&[][..], input),
    };
    let Ok(body) = std::str::from_utf8(body) else {
        return;
    };
    let encoded = encode(body, sizes);
    match dechunk(&encoded) {
        Ok(decoded) => assert_eq!(decoded, body, "{encoded:?} dechunked"),
        Err(error) => panic!("{encoded:?}, chunked by the reference, is refused: {error}"),
    }
    let whole = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{encoded}");
    match parse_response(whole.as_bytes()) {
        Ok(parsed) => assert_eq!(parsed, (200, body.to_owned()), "{whole:?}"),
        Err(error) => panic!("{whole:?} is refused: {error}"),
    }
}

/// `body` in chunks of the `sizes` (cycled; at least one byte each, moved to
/// the next character boundary), as RFC 9112 §7.1 writes them: hex size
/// (upper case where the size byte is odd), an extension where it is above
/// 0x7f, CRLF, the data, CRLF; then the last chunk and the empty trailer.
fn encode(body: &str, sizes: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let size_byte = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(16);
        i += 1;
        let mut size = usize::from(size_byte % 0x80).max(1).min(rest.len());
        while !rest.is_char_boundary(size) {
            size += 1;
        }
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        if size_byte % 2 == 1 {
            out.push_str(&format!("{size:X}"));
        } else {
            out.push_str(&format!("{size:x}"));
        }
        if size_byte > 0x7f {
            out.push_str(";name=value");
        }
        out.push_str("\r\n");
        out.push_str(chunk);
        out.push_str("\r\n");
    }
    out.push_str("0\r\n\r\n");
    out
}

fn metrics(text: &str) {
    let samples = match parse_metrics(text) {
        Ok(samples) => samples,
        Err(error) => {
            assert_message(&error.to_string(), &error);
            return;
        }
    };
    let rendered = render(&samples);
    match parse_metrics(&rendered) {
        Ok(again) => {
            assert_eq!(again.len(), samples.len(), "{rendered:?}");
            for (again, sample) in again.iter().zip(&samples) {
                assert!(
                    same(again, sample),
                    "{sample:?} came back as {again:?} from {rendered:?}"
                );
            }
        }
        Err(error) => panic!("{rendered:?}, rendered from {samples:?}, is refused: {error}"),
    }
}

/// The exposition format of `samples`: `name{label="value",…} value`, with
/// `\`, `"` and newlines in label values escaped.
fn render(samples: &[Sample]) -> String {
    let mut out = String::new();
    for sample in samples {
        out.push_str(&sample.name);
        if !sample.labels.is_empty() {
            let labels: Vec<String> = sample
                .labels
                .iter()
                .map(|(name, value)| {
                    let value = value
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    format!("{name}=\"{value}\"")
                })
                .collect();
            out.push_str(&format!("{{{}}}", labels.join(",")));
        }
        let value = match sample.value {
            f64::INFINITY => "+Inf".to_owned(),
            f64::NEG_INFINITY => "-Inf".to_owned(),
            v if v.is_nan() => "NaN".to_owned(),
            v => v.to_string(),
        };
        out.push_str(&format!(" {value}\n"));
    }
    out.push_str("# EOF\n");
    out
}

/// Equal, a NaN being equal to a NaN.
fn same(a: &Sample, b: &Sample) -> bool {
    a.name == b.name
        && a.labels == b.labels
        && (a.value == b.value || (a.value.is_nan() && b.value.is_nan()))
}
