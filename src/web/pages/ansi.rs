//! Console output with ANSI colours, as HTML: SGR sequences (`ESC [ … m`)
//! become `<span>`s with classes (`f1`…`f15` foreground, `b` bold, `u`
//! underline, `d` dim); every other escape sequence (cursor movement, line
//! erasure from Bazel's progress bar) is dropped. All text is escaped.

use maud::{Escaper, Markup, PreEscaped};
use std::fmt::Write;

#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct Style {
    fg: Option<u8>,
    bold: bool,
    dim: bool,
    underline: bool,
}

impl Style {
    fn is_plain(&self) -> bool {
        *self == Style::default()
    }

    fn classes(&self) -> String {
        let mut c = Vec::new();
        if let Some(f) = self.fg {
            c.push(format!("f{f}"));
        }
        if self.bold {
            c.push("b".into());
        }
        if self.dim {
            c.push("d".into());
        }
        if self.underline {
            c.push("u".into());
        }
        c.join(" ")
    }

    fn apply(&mut self, params: &str) {
        let codes: Vec<u32> = if params.is_empty() {
            vec![0]
        } else {
            params.split(';').map(|p| p.parse().unwrap_or(0)).collect()
        };
        let mut i = 0;
        while i < codes.len() {
            match codes[i] {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                4 => self.underline = true,
                22 => {
                    self.bold = false;
                    self.dim = false
                }
                24 => self.underline = false,
                c @ 30..=37 => self.fg = Some((c - 30) as u8),
                39 => self.fg = None,
                c @ 90..=97 => self.fg = Some((c - 90 + 8) as u8),
                // 256-colour and true colour: skip their arguments.
                38 | 48 => {
                    i += match codes.get(i + 1) {
                        Some(5) => 2,
                        Some(2) => 4,
                        _ => 0,
                    };
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// `text` as HTML with its colours.
pub fn render(text: &str) -> Markup {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let mut style = Style::default();
    let mut open = false;
    let mut rest = text;
    while !rest.is_empty() {
        let (plain, after) = match rest.find('\x1b') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if !plain.is_empty() {
            if !open && !style.is_plain() {
                let _ = write!(out, "<span class=\"{}\">", style.classes());
                open = true;
            }
            // Carriage returns redraw a line on a terminal; here they end it.
            let _ =
                Escaper::new(&mut out).write_str(&plain.replace("\r\n", "\n").replace('\r', "\n"));
        }
        let Some(after) = after else { break };
        // ESC [ params final-byte; anything else: drop ESC and the next char.
        if let Some(seq) = after.strip_prefix('[') {
            let end = seq.char_indices().find(|(_, c)| ('@'..='~').contains(c));
            match end {
                Some((i, 'm')) => {
                    if open {
                        out.push_str("</span>");
                        open = false;
                    }
                    style.apply(&seq[..i]);
                    rest = &seq[i + 1..];
                }
                Some((i, c)) => rest = &seq[i + c.len_utf8()..],
                None => rest = "",
            }
        } else {
            let mut chars = after.chars();
            chars.next();
            rest = chars.as_str();
        }
    }
    if open {
        out.push_str("</span>");
    }
    PreEscaped(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_become_spans_and_text_is_escaped() {
        let r = render("\x1b[31mERROR:\x1b[0m <script>alert(1)</script>\r\n\x1b[1A\x1b[Kdone");
        assert_eq!(
            r.0,
            "<span class=\"f1\">ERROR:</span> &lt;script&gt;alert(1)&lt;/script&gt;\ndone"
        );
        assert_eq!(render("\x1b[1;32mok").0, "<span class=\"f2 b\">ok</span>");
        assert_eq!(render("a\x1b").0, "a");
        assert_eq!(render("\x1b[38;5;196mred\x1b[m").0, "red");
        assert_eq!(render("\"q\" & 'a'").0, "&quot;q&quot; &amp; 'a'");
    }
}
