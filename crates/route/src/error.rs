//! Parse errors with line:column positions.

use std::fmt;

/// A syntax or validation error at a position in a route or condition text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct ParseError {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
    /// What went wrong, e.g. "expected INTO, found end of text".
    pub message: String,
}

impl ParseError {
    /// An error at byte offset `at` of `src`.
    pub(crate) fn at(src: &str, at: usize, message: String) -> Self {
        let before = src.get(..at).unwrap_or(src);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Self {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
            message,
        }
    }
}

/// A route that failed to parse, naming the route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route \"{route}\" {error}")]
pub struct RouteError {
    /// The route's name.
    pub route: String,
    /// Where and why.
    pub error: ParseError,
}

/// A route set was rejected: every bad route, in input order. The whole set is refused so
/// the caller can keep running the previous one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RouteSetError {
    /// One entry per bad route (never empty).
    pub errors: Vec<RouteError>,
}

impl fmt::Display for RouteSetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
