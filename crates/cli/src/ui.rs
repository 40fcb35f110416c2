//! Terminal output: colour only for a terminal (and never with `NO_COLOR`),
//! aligned tables, humanised durations.

use std::io::IsTerminal as _;
use std::time::Duration;

/// Whether stdout gets ANSI colours.
pub fn colour_enabled() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stdout().is_terminal()
}

/// ANSI colours used by the CLI.
#[derive(Debug, Clone, Copy)]
pub enum Colour {
    /// OK.
    Green,
    /// Warning.
    Yellow,
    /// Error.
    Red,
    /// Headings.
    Bold,
}

/// `text` wrapped in the colour's escape codes when `on`.
pub fn paint(on: bool, colour: Colour, text: &str) -> String {
    if !on {
        return text.to_owned();
    }
    let code = match colour {
        Colour::Green => "32",
        Colour::Yellow => "33",
        Colour::Red => "31",
        Colour::Bold => "1",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// Left-aligned columns separated by three spaces; the last column is not
/// padded (no trailing blanks). Widths count characters, not bytes.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    table_styled(header, rows, &|_, _, cell| cell.to_owned())
}

/// [`table`], with `style(row, column, cell)` applied to each cell after the
/// widths are measured (row 0 is the header), so colour codes never skew the
/// alignment.
pub fn table_styled(
    header: &[&str],
    rows: &[Vec<String>],
    style: &dyn Fn(usize, usize, &str) -> String,
) -> String {
    let cols = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut out = String::new();
    for (r, row) in std::iter::once(&header).chain(rows).enumerate() {
        // Trailing empty cells would leave trailing blanks.
        let last = row
            .iter()
            .take(cols)
            .rposition(|c| !c.is_empty())
            .unwrap_or(0);
        for (i, cell) in row.iter().enumerate().take(last + 1) {
            out.push_str(&style(r, i, cell));
            if i < last {
                let pad = widths[i] - cell.chars().count() + 3;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

fn plural(n: u64, unit: &str) -> String {
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

/// A duration as people say it: exact up to 20 seconds, then rounded down
/// to the largest sensible unit ("5 minutes", "2 hours", "3 days").
pub fn humanise(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "less than a second".to_owned(),
        1..=20 => plural(s, "second"),
        21..=59 => "less than a minute".to_owned(),
        60..=3_599 => plural(s / 60, "minute"),
        3_600..=172_799 => plural(s / 3_600, "hour"),
        172_800..=1_209_599 => plural(s / 86_400, "day"),
        1_209_600..=5_183_999 => plural(s / 604_800, "week"),
        5_184_000..=63_071_999 => plural(s / 2_592_000, "month"),
        _ => plural(s / 31_536_000, "year"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanises() {
        let h = |s| humanise(Duration::from_secs(s));
        assert_eq!(h(0), "less than a second");
        assert_eq!(h(1), "1 second");
        assert_eq!(h(20), "20 seconds");
        assert_eq!(h(45), "less than a minute");
        assert_eq!(h(60), "1 minute");
        assert_eq!(h(5 * 60 + 59), "5 minutes");
        assert_eq!(h(2 * 3600 + 10), "2 hours");
        assert_eq!(h(47 * 3600), "47 hours");
        assert_eq!(h(3 * 86_400), "3 days");
        assert_eq!(h(15 * 86_400), "2 weeks");
        assert_eq!(h(90 * 86_400), "3 months");
        assert_eq!(h(800 * 86_400), "2 years");
    }

    #[test]
    fn tables_align_by_characters_without_trailing_blanks() {
        let t = table(
            &["NAME", "STATUS", "X"],
            &[
                vec!["ä".into(), "running".into(), "".into()],
                vec!["longname".into(), "s".into(), "z".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME       STATUS    X\nä          running\nlongname   s         z\n"
        );
    }

    #[test]
    fn paints_only_when_on() {
        assert_eq!(paint(false, Colour::Red, "x"), "x");
        assert_eq!(paint(true, Colour::Red, "x"), "\x1b[31mx\x1b[0m");
    }
}
