//! The parsed (not yet compiled) form of a condition, and its printer.
//!
//! [`Expr`]'s `Display` prints text that parses back to the same tree.

use std::fmt;

/// A literal value written in a condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `'text'` or `"text"`.
    Str(String),
    /// Any number: integer, real, exponent or hex (all doubles).
    Num(f64),
    /// `true` / `false`.
    Bool(bool),
    /// `null`.
    Null,
    /// `undefined`.
    Undefined,
}

/// A prefix operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    /// `NOT`.
    Not,
    /// `-`.
    Neg,
}

/// An infix operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    /// `??`.
    Coalesce,
    /// `OR`.
    Or,
    /// `AND`.
    And,
    /// `=`.
    Eq,
    /// `!=` or `<>`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `+`.
    Add,
    /// `-`.
    Sub,
    /// `||` (string concatenation).
    Concat,
    /// `*`.
    Mul,
    /// `/`.
    Div,
    /// `%`.
    Mod,
}

impl BinaryOp {
    /// Binding strength: larger binds tighter. All binary operators are left-associative.
    pub fn precedence(self) -> u8 {
        match self {
            Self::Coalesce => 1,
            Self::Or => 2,
            Self::And => 3,
            Self::Eq | Self::Ne => 4,
            Self::Lt | Self::Le | Self::Gt | Self::Ge => 5,
            Self::Add | Self::Sub | Self::Concat => 6,
            Self::Mul | Self::Div | Self::Mod => 7,
        }
    }

    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Coalesce => "??",
            Self::Or => "OR",
            Self::And => "AND",
            Self::Eq => "=",
            Self::Ne => "!=",
            Self::Lt => "<",
            Self::Le => "<=",
            Self::Gt => ">",
            Self::Ge => ">=",
            Self::Add => "+",
            Self::Sub => "-",
            Self::Concat => "||",
            Self::Mul => "*",
            Self::Div => "/",
            Self::Mod => "%",
        }
    }
}

/// Precedence of prefix `NOT` and `-`: tighter than every binary operator (as in IoT Edge's grammar,
/// so `NOT a = b` means `(NOT a) = b`).
pub const UNARY_PRECEDENCE: u8 = 8;

/// A built-in function (names are case-insensitive in route text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Func {
    /// `abs(x)`.
    Abs,
    /// `exp(x)`.
    Exp,
    /// `power(x, y)`.
    Power,
    /// `square(x)`.
    Square,
    /// `ceiling(x)`.
    Ceiling,
    /// `floor(x)`.
    Floor,
    /// `sign(x)`.
    Sign,
    /// `sqrt(x)`.
    Sqrt,
    /// `as_number(x)`.
    AsNumber,
    /// `is_bool(x)`.
    IsBool,
    /// `is_defined(x)`.
    IsDefined,
    /// `is_null(x)`.
    IsNull,
    /// `is_number(x)`.
    IsNumber,
    /// `is_string(x)`.
    IsString,
    /// `concat(s1, s2, …)`.
    Concat,
    /// `length(s)`.
    Length,
    /// `lower(s)`.
    Lower,
    /// `upper(s)`.
    Upper,
    /// `substring(s, start[, length])`.
    Substring,
    /// `index_of(s, t)`.
    IndexOf,
    /// `starts_with(s, t)`.
    StartsWith,
    /// `ends_with(s, t)`.
    EndsWith,
    /// `contains(s, t)`.
    Contains,
}

impl Func {
    /// Every function that takes expression arguments.
    pub const ALL: [Func; 23] = [
        Self::Abs,
        Self::Exp,
        Self::Power,
        Self::Square,
        Self::Ceiling,
        Self::Floor,
        Self::Sign,
        Self::Sqrt,
        Self::AsNumber,
        Self::IsBool,
        Self::IsDefined,
        Self::IsNull,
        Self::IsNumber,
        Self::IsString,
        Self::Concat,
        Self::Length,
        Self::Lower,
        Self::Upper,
        Self::Substring,
        Self::IndexOf,
        Self::StartsWith,
        Self::EndsWith,
        Self::Contains,
    ];

    /// The canonical (lower-case) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Abs => "abs",
            Self::Exp => "exp",
            Self::Power => "power",
            Self::Square => "square",
            Self::Ceiling => "ceiling",
            Self::Floor => "floor",
            Self::Sign => "sign",
            Self::Sqrt => "sqrt",
            Self::AsNumber => "as_number",
            Self::IsBool => "is_bool",
            Self::IsDefined => "is_defined",
            Self::IsNull => "is_null",
            Self::IsNumber => "is_number",
            Self::IsString => "is_string",
            Self::Concat => "concat",
            Self::Length => "length",
            Self::Lower => "lower",
            Self::Upper => "upper",
            Self::Substring => "substring",
            Self::IndexOf => "index_of",
            Self::StartsWith => "starts_with",
            Self::EndsWith => "ends_with",
            Self::Contains => "contains",
        }
    }

    /// Looks a function up by name, case-insensitively.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }

    /// Smallest and largest number of arguments (`None`: unbounded).
    pub fn arity(self) -> (usize, Option<usize>) {
        match self {
            Self::Power | Self::IndexOf | Self::StartsWith | Self::EndsWith | Self::Contains => {
                (2, Some(2))
            }
            Self::Substring => (2, Some(3)),
            Self::Concat => (1, None),
            _ => (1, Some(1)),
        }
    }
}

/// A condition expression, as written (after parsing, before compilation).
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal.
    Lit(Literal),
    /// A bare identifier: an application property of that name.
    Prop(String),
    /// `$name` (stored without the `$`): the application property `$name` if present, else the
    /// system property `name`; `$body.…` is a body query.
    Dollar(String),
    /// `{$name}` (stored without the `$`): a system property (or body query), never an
    /// application property.
    SysOnly(String),
    /// A prefix operator.
    Unary(UnaryOp, Box<Expr>),
    /// An infix operator.
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// A built-in function call.
    Call(Func, Vec<Expr>),
    /// `twin_change_includes(path)`: the path as written, e.g. `properties.reported.x`.
    TwinChangeIncludes(String),
}

impl Expr {
    fn precedence(&self) -> u8 {
        match self {
            Expr::Binary(op, ..) => op.precedence(),
            Expr::Unary(..) => UNARY_PRECEDENCE,
            // A negative number literal prints as `-n`, which reads back as a prefix minus.
            Expr::Lit(Literal::Num(n)) if n.is_sign_negative() => UNARY_PRECEDENCE,
            _ => u8::MAX,
        }
    }
}

fn fmt_num(n: f64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if n.is_nan() {
        // Cannot be written in the language; print something that is at least undefined-ish.
        f.write_str("undefined")
    } else if n.is_infinite() {
        f.write_str(if n > 0.0 { "1e999" } else { "-1e999" })
    } else {
        write!(f, "{n}")
    }
}

fn fmt_str(s: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str("'")?;
    for c in s.chars() {
        match c {
            '\'' => f.write_str("\\'")?,
            '\\' => f.write_str("\\\\")?,
            c if (c as u32) < 0x20 || c == '\u{7f}' => write!(f, "\\u{:04x}", c as u32)?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("'")
}

fn fmt_operand(e: &Expr, parens: bool, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if parens {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Str(s) => fmt_str(s, f),
            Literal::Num(n) => fmt_num(*n, f),
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Null => f.write_str("null"),
            Literal::Undefined => f.write_str("undefined"),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Lit(l) => write!(f, "{l}"),
            Expr::Prop(name) => f.write_str(name),
            Expr::Dollar(name) => write!(f, "${name}"),
            Expr::SysOnly(name) => write!(f, "{{${name}}}"),
            Expr::Unary(op, e) => {
                f.write_str(match op {
                    UnaryOp::Not => "NOT ",
                    UnaryOp::Neg => "-",
                })?;
                // `-(1)` keeps a negated literal apart from the literal `-1`.
                let parens = e.precedence() < UNARY_PRECEDENCE
                    || (*op == UnaryOp::Neg && matches!(**e, Expr::Lit(Literal::Num(_))));
                fmt_operand(e, parens, f)
            }
            Expr::Binary(op, l, r) => {
                let p = op.precedence();
                fmt_operand(l, l.precedence() < p, f)?;
                write!(f, " {} ", op.symbol())?;
                fmt_operand(r, r.precedence() <= p, f)
            }
            Expr::Call(func, args) => {
                write!(f, "{}(", func.name())?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str(")")
            }
            Expr::TwinChangeIncludes(path) => {
                // Bare when it reads back as one name; quoted otherwise (both forms parse).
                let keyword = ["and", "or", "not", "select", "from", "where", "into"]
                    .iter()
                    .any(|k| k.eq_ignore_ascii_case(path))
                    || ["true", "false", "null", "undefined"].contains(&path.as_str());
                let bare = !keyword
                    && path.starts_with(|c: char| c == '_' || c.is_alphabetic())
                    && path
                        .chars()
                        .all(|c| !(c.is_whitespace() || "()<>@,;:\\\"/[]?={}+*%|!'$".contains(c)));
                f.write_str("twin_change_includes(")?;
                if bare {
                    f.write_str(path)?;
                } else {
                    fmt_str(path, f)?;
                }
                f.write_str(")")
            }
        }
    }
}
