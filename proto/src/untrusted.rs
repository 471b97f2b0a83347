//! Text from outside (a requested identity, an SNI, a token's claims, a
//! Kubernetes name or annotation, a file's contents, an error that quotes
//! any of them) as a log line may show it: one value can neither end the
//! line and forge the next one, nor drive the terminal that shows the log.

use std::fmt::{self, Write as _};

/// The most characters of one value a log line shows; the rest are counted.
pub const MAX_LOGGED_CHARS: usize = 2048;

/// `value`, fit for a log line:
/// `tracing::warn!(identity = %Untrusted(&request.identity), error = %Untrusted(&e), "…")`.
///
/// Every character that is not printable is shown escaped, as
/// [`char::escape_debug`] shows it: C0 and C1 controls (`\n`, `\r`, `\t`,
/// ESC as `\u{1b}`, …), DEL, the bidirectional embeddings, overrides and
/// isolates, the line and paragraph separators U+2028 and U+2029, and the
/// other invisible format characters. Backslashes and quotes stay as they
/// are: they break no line, and a message that already quotes its input with
/// `{:?}` reads the same. After [`MAX_LOGGED_CHARS`] characters the value is
/// cut, with a count of what was left out.
///
/// Both log formats need it: the text format writes a `%` field as it is,
/// and the JSON format escapes C0 controls but writes C1 controls, DEL and
/// the bidirectional characters as they are.
pub struct Untrusted<T>(pub T);

impl<T: fmt::Display> fmt::Display for Untrusted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cut = {
            let mut escaper = Escaper {
                out: f,
                shown: 0,
                cut: 0,
            };
            write!(escaper, "{}", self.0)?;
            escaper.cut
        };
        match cut {
            0 => {}
            1 => f.write_str("… (1 more character)")?,
            _ => write!(f, "… ({cut} more characters)")?,
        }
        Ok(())
    }
}

/// Writes what it is given escaped, up to [`MAX_LOGGED_CHARS`] characters.
struct Escaper<'a, 'b> {
    out: &'a mut fmt::Formatter<'b>,
    shown: usize,
    cut: usize,
}

impl fmt::Write for Escaper<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.shown == MAX_LOGGED_CHARS {
                self.cut += 1;
                continue;
            }
            self.shown += 1;
            if is_shown_escaped(c) {
                write!(self.out, "{}", c.escape_debug())?;
            } else {
                self.out.write_char(c)?;
            }
        }
        Ok(())
    }
}

fn is_shown_escaped(c: char) -> bool {
    !matches!(c, '\\' | '"' | '\'') && c.escape_debug().len() > 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(value: &str) -> String {
        Untrusted(value).to_string()
    }

    #[test]
    fn plain_text_is_unchanged() {
        for plain in [
            "spiffe://cluster.local/ns/shop/sa/api",
            "pod shop/web-0 runs on node n2, not on n1",
            r#"requested identity: "spiffe://x\n" does not start with spiffe://"#,
            "it's a \\ backslash",
            "café, Straße, 日本語, emoji 🚢",
            "",
        ] {
            assert_eq!(shown(plain), plain);
        }
    }

    #[test]
    fn every_control_character_class_is_escaped() {
        let cases = [
            ("\n", r"\n"),
            ("\r", r"\r"),
            ("\t", r"\t"),
            ("\0", r"\0"),
            ("\x07", r"\u{7}"),
            ("\x08", r"\u{8}"),
            ("\x1b[2J", r"\u{1b}[2J"),
            ("\x1f", r"\u{1f}"),
            ("\x7f", r"\u{7f}"),
            ("\u{80}", r"\u{80}"),
            ("\u{85}", r"\u{85}"),
            ("\u{9b}2J", r"\u{9b}2J"),
            ("\u{9f}", r"\u{9f}"),
            ("\u{2028}", r"\u{2028}"),
            ("\u{2029}", r"\u{2029}"),
            ("\u{202a}\u{202b}\u{202c}", r"\u{202a}\u{202b}\u{202c}"),
            ("\u{202d}\u{202e}", r"\u{202d}\u{202e}"),
            (
                "\u{2066}\u{2067}\u{2068}\u{2069}",
                r"\u{2066}\u{2067}\u{2068}\u{2069}",
            ),
            ("\u{200e}\u{200f}\u{61c}", r"\u{200e}\u{200f}\u{61c}"),
            ("\u{200b}\u{feff}", r"\u{200b}\u{feff}"),
        ];
        for (raw, escaped) in cases {
            assert_eq!(shown(raw), escaped, "{raw:?}");
        }
        let all: String = (0u32..0x20)
            .chain(0x7f..0xa0)
            .filter_map(char::from_u32)
            .collect();
        assert!(
            shown(&all).chars().all(|c| c.is_ascii_graphic()),
            "{}",
            shown(&all)
        );
    }

    #[test]
    fn a_forged_log_line_stays_on_its_line() {
        let identity = "x\n2026-01-01T00:00:00Z  INFO ferry_ca::service: issued a certificate identity=spiffe://cluster.local/ns/kube-system/sa/admin\x1b[2J";
        let line = format!("WARN refused identity={}", Untrusted(identity));
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.ends_with(r"sa/admin\u{1b}[2J"), "{line}");
    }

    #[test]
    fn a_long_value_is_cut_with_a_count() {
        let long = "a".repeat(MAX_LOGGED_CHARS + 10);
        assert_eq!(
            shown(&long),
            format!("{}… (10 more characters)", "a".repeat(MAX_LOGGED_CHARS))
        );
        let exact = "b".repeat(MAX_LOGGED_CHARS);
        assert_eq!(shown(&exact), exact);
        // Characters are counted, not bytes, and an escape counts as one.
        let newlines = "\n".repeat(MAX_LOGGED_CHARS + 1);
        assert_eq!(
            shown(&newlines),
            format!("{}… (1 more character)", r"\n".repeat(MAX_LOGGED_CHARS))
        );
    }

    #[test]
    fn any_display_is_escaped_as_it_is_written() {
        let error = crate::SpiffeIdError::Scheme("\x1b[2J".to_owned());
        let composed = format!("{}", Untrusted(format_args!("a\n{}\tb", 7)));
        assert_eq!(composed, r"a\n7\tb");
        // Debug already escaped the value; it is not escaped twice.
        assert_eq!(
            Untrusted(&error).to_string(),
            r#""\u{1b}[2J" does not start with spiffe://"#
        );
    }
}
