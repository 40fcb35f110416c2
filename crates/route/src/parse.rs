//! Hand-written lexer and Pratt parser for routes and conditions.

use crate::ast::{BinaryOp, Expr, Func, Literal, UNARY_PRECEDENCE, UnaryOp};
use crate::error::ParseError;
use crate::json::parse_body_path;
use crate::route::Endpoint;

/// Deepest expression tree accepted; keeps compilation, evaluation and printing off the stack limit.
pub const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq)]
enum Tok<'s> {
    Ident(&'s str),
    Dollar(&'s str),
    Str(String),
    Num(f64),
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    Op(BinaryOp),
    Minus,
    Star,
    Not,
    True,
    False,
    Null,
    Undefined,
    Eof,
}

impl Tok<'_> {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Dollar(s) => format!("`${s}`"),
            Tok::Str(_) => "a string".into(),
            Tok::Num(_) => "a number".into(),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::LBrace => "`{`".into(),
            Tok::RBrace => "`}`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Op(op) => format!("`{}`", op.symbol()),
            Tok::Minus => "`-`".into(),
            Tok::Star => "`*`".into(),
            Tok::Not => "`NOT`".into(),
            Tok::True => "`true`".into(),
            Tok::False => "`false`".into(),
            Tok::Null => "`null`".into(),
            Tok::Undefined => "`undefined`".into(),
            Tok::Eof => "end of text".into(),
        }
    }
}

/// Characters that never belong to a name (IoT Edge's grammar, plus the operator characters
/// `+ * % | ! ' ?` so that `a+b` is an addition).
fn is_name_char(c: char) -> bool {
    !(c.is_whitespace() || "()<>@,;:\\\"/[]?={}+*%|!'".contains(c))
}

fn is_name_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_reserved(word: &str) -> bool {
    ["select", "from", "where", "into"]
        .iter()
        .any(|k| k.eq_ignore_ascii_case(word))
}

pub(crate) struct Parser<'s> {
    src: &'s str,
    pos: usize,
    peeked: Option<(Tok<'s>, usize)>,
    last_start: usize,
    nesting: usize,
}

type PResult<T> = Result<T, ParseError>;

impl<'s> Parser<'s> {
    pub(crate) fn new(src: &'s str) -> Self {
        Self {
            src,
            pos: 0,
            peeked: None,
            last_start: 0,
            nesting: 0,
        }
    }

    fn err_at(&self, at: usize, message: impl Into<String>) -> ParseError {
        ParseError::at(self.src, at, message.into())
    }

    fn rest(&self) -> &'s str {
        self.src.get(self.pos..).unwrap_or("")
    }

    fn skip_trivia(&mut self) -> PResult<()> {
        loop {
            let rest = self.rest();
            let trimmed = rest.trim_start();
            self.pos += rest.len() - trimmed.len();
            if let Some(body) = trimmed.strip_prefix("/*") {
                match body.find("*/") {
                    Some(end) => self.pos += end + 4,
                    None => return Err(self.err_at(self.pos, "unterminated comment")),
                }
            } else {
                return Ok(());
            }
        }
    }

    fn lex(&mut self) -> PResult<(Tok<'s>, usize)> {
        self.skip_trivia()?;
        let start = self.pos;
        let rest = self.rest();
        let mut chars = rest.chars();
        let Some(c) = chars.next() else {
            return Ok((Tok::Eof, start));
        };
        let next = chars.next();
        let two = |t: Tok<'s>| (t, 2usize);
        let one = |t: Tok<'s>| (t, 1usize);
        let (tok, len) = match (c, next) {
            ('(', _) => one(Tok::LParen),
            (')', _) => one(Tok::RParen),
            ('{', _) => one(Tok::LBrace),
            ('}', _) => one(Tok::RBrace),
            (',', _) => one(Tok::Comma),
            ('+', _) => one(Tok::Op(BinaryOp::Add)),
            ('-', _) => one(Tok::Minus),
            ('*', _) => one(Tok::Star),
            ('/', _) => one(Tok::Op(BinaryOp::Div)),
            ('%', _) => one(Tok::Op(BinaryOp::Mod)),
            ('=', _) => one(Tok::Op(BinaryOp::Eq)),
            ('!', Some('=')) => two(Tok::Op(BinaryOp::Ne)),
            ('<', Some('>')) => two(Tok::Op(BinaryOp::Ne)),
            ('<', Some('=')) => two(Tok::Op(BinaryOp::Le)),
            ('<', _) => one(Tok::Op(BinaryOp::Lt)),
            ('>', Some('=')) => two(Tok::Op(BinaryOp::Ge)),
            ('>', _) => one(Tok::Op(BinaryOp::Gt)),
            ('|', Some('|')) => two(Tok::Op(BinaryOp::Concat)),
            ('?', Some('?')) => two(Tok::Op(BinaryOp::Coalesce)),
            ('\'' | '"', _) => return self.lex_string(c, start),
            ('0'..='9', _) => return self.lex_number(start),
            ('.', Some('0'..='9')) => return self.lex_number(start),
            ('$', _) => {
                let mut depth = 0u32;
                let mut end = 1;
                for ch in rest[1..].chars() {
                    let ok = match ch {
                        '[' => {
                            depth += 1;
                            true
                        }
                        ']' if depth > 0 => {
                            depth -= 1;
                            true
                        }
                        '\'' => depth > 0,
                        _ => is_name_char(ch),
                    };
                    if !ok {
                        break;
                    }
                    end += ch.len_utf8();
                }
                if end == 1 {
                    return Err(self.err_at(start, "expected a property name after `$`"));
                }
                (Tok::Dollar(&rest[1..end]), end)
            }
            (c, _) if is_name_start(c) => {
                let end = rest
                    .char_indices()
                    .find(|&(_, ch)| !is_name_char(ch))
                    .map_or(rest.len(), |(i, _)| i);
                let word = &rest[..end];
                let tok = if word.eq_ignore_ascii_case("and") {
                    Tok::Op(BinaryOp::And)
                } else if word.eq_ignore_ascii_case("or") {
                    Tok::Op(BinaryOp::Or)
                } else if word.eq_ignore_ascii_case("not") {
                    Tok::Not
                } else {
                    match word {
                        "true" => Tok::True,
                        "false" => Tok::False,
                        "null" => Tok::Null,
                        "undefined" => Tok::Undefined,
                        _ => Tok::Ident(word),
                    }
                };
                (tok, end)
            }
            (c, _) => return Err(self.err_at(start, format!("unexpected character `{c}`"))),
        };
        self.pos += len;
        Ok((tok, start))
    }

    fn lex_string(&mut self, quote: char, start: usize) -> PResult<(Tok<'s>, usize)> {
        let mut out = String::new();
        let mut it = self.src[start + 1..].char_indices();
        while let Some((i, c)) = it.next() {
            let at = start + 1 + i;
            match c {
                c if c == quote => {
                    self.pos = at + 1;
                    return Ok((Tok::Str(out), start));
                }
                '\\' => {
                    let Some((_, e)) = it.next() else { break };
                    match e {
                        '\\' | '\'' | '"' | '/' => out.push(e),
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'u' | 'U' => {
                            let hex: String = it.by_ref().take(4).map(|(_, h)| h).collect();
                            let cp = (hex.len() == 4)
                                .then(|| u32::from_str_radix(&hex, 16).ok())
                                .flatten()
                                .ok_or_else(|| {
                                    self.err_at(at, "expected four hex digits after `\\u`")
                                })?;
                            out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                        }
                        other => {
                            return Err(
                                self.err_at(at, format!("unknown escape sequence `\\{other}`"))
                            );
                        }
                    }
                }
                c => out.push(c),
            }
        }
        Err(self.err_at(start, "unterminated string"))
    }

    fn lex_number(&mut self, start: usize) -> PResult<(Tok<'s>, usize)> {
        let rest = &self.src[start..];
        let b = rest.as_bytes();
        let bad = |p: &Self| p.err_at(start, "invalid number");
        let (value, end) = if b.len() > 2 && b[0] == b'0' && (b[1] | 0x20) == b'x' {
            let digits = b[2..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
            if digits == 0 {
                return Err(bad(self));
            }
            let v = rest[2..2 + digits].chars().fold(0f64, |acc, c| {
                acc * 16.0 + f64::from(c.to_digit(16).unwrap_or(0))
            });
            (v, 2 + digits)
        } else {
            let mut i = b.iter().take_while(|c| c.is_ascii_digit()).count();
            if i < b.len() && b[i] == b'.' {
                let frac = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                if frac == 0 {
                    return Err(self.err_at(start + i, "expected digits after `.`"));
                }
                i += 1 + frac;
            }
            if i < b.len() && (b[i] | 0x20) == b'e' {
                let mut j = i + 1;
                if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
                    j += 1;
                }
                let exp = b[j..].iter().take_while(|c| c.is_ascii_digit()).count();
                if exp == 0 {
                    return Err(self.err_at(start + i, "expected digits in the exponent"));
                }
                i = j + exp;
            }
            let v: f64 = rest[..i].parse().map_err(|_| bad(self))?;
            (v, i)
        };
        // `1-2` is a subtraction; letters, digits or dots glued to a number are an error.
        if rest[end..]
            .chars()
            .next()
            .is_some_and(|c| c != '-' && is_name_char(c))
        {
            return Err(bad(self));
        }
        self.pos = start + end;
        Ok((Tok::Num(value), start))
    }

    fn peek(&mut self) -> PResult<&Tok<'s>> {
        if self.peeked.is_none() {
            let t = self.lex()?;
            self.peeked = Some(t);
        }
        match &self.peeked {
            Some((t, _)) => Ok(t),
            None => Ok(&Tok::Eof),
        }
    }

    fn peek_start(&mut self) -> PResult<usize> {
        self.peek()?;
        Ok(self.peeked.as_ref().map_or(self.pos, |(_, s)| *s))
    }

    fn next(&mut self) -> PResult<Tok<'s>> {
        let (t, s) = match self.peeked.take() {
            Some(t) => t,
            None => self.lex()?,
        };
        self.last_start = s;
        Ok(t)
    }

    fn unexpected(&mut self, expected: &str) -> ParseError {
        match self.peek() {
            Ok(t) => {
                let found = t.describe();
                let at = self.peek_start().unwrap_or(self.pos);
                self.err_at(at, format!("expected {expected}, found {found}"))
            }
            Err(e) => e,
        }
    }

    fn expect(&mut self, want: &Tok<'_>, what: &str) -> PResult<()> {
        if self.peek()? == want {
            self.next()?;
            Ok(())
        } else {
            Err(self.unexpected(what))
        }
    }

    fn keyword(&mut self, kw: &str) -> PResult<bool> {
        if matches!(self.peek()?, Tok::Ident(w) if w.eq_ignore_ascii_case(kw)) {
            self.next()?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Parses a whole condition (nothing may follow it).
    pub(crate) fn condition(mut self) -> PResult<Expr> {
        let (e, _) = self.expr(0)?;
        if self.peek()? != &Tok::Eof {
            return Err(self.unexpected("an operator or end of condition"));
        }
        Ok(e)
    }

    /// Parses an expression whose operators bind at least as tight as `min`; returns it and its depth.
    fn expr(&mut self, min: u8) -> PResult<(Expr, usize)> {
        self.nesting += 1;
        if self.nesting > MAX_DEPTH {
            let at = self.peek_start()?;
            return Err(self.err_at(at, "expression nested too deeply"));
        }
        let r = self.expr_inner(min);
        self.nesting -= 1;
        r
    }

    fn expr_inner(&mut self, min: u8) -> PResult<(Expr, usize)> {
        let (mut lhs, mut depth) = self.prefix()?;
        loop {
            let op = match self.peek()? {
                Tok::Op(op) => *op,
                Tok::Minus => BinaryOp::Sub,
                Tok::Star => BinaryOp::Mul,
                _ => break,
            };
            let p = op.precedence();
            if p < min {
                break;
            }
            self.next()?;
            let at = self.last_start;
            let (rhs, rd) = self.expr(p + 1)?;
            depth = depth.max(rd) + 1;
            if depth > MAX_DEPTH {
                return Err(self.err_at(at, "expression nested too deeply"));
            }
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs));
        }
        Ok((lhs, depth))
    }

    fn prefix(&mut self) -> PResult<(Expr, usize)> {
        let at = self.peek_start()?;
        let tok = self.next()?;
        let leaf = |e: Expr| Ok((e, 1));
        match tok {
            Tok::Not | Tok::Minus => {
                if tok == Tok::Minus
                    && let Tok::Num(n) = self.peek()?
                {
                    let n = *n;
                    self.next()?;
                    return leaf(Expr::Lit(Literal::Num(-n)));
                }
                let op = if tok == Tok::Not {
                    UnaryOp::Not
                } else {
                    UnaryOp::Neg
                };
                let (e, d) = self.expr(UNARY_PRECEDENCE)?;
                if d + 1 > MAX_DEPTH {
                    return Err(self.err_at(at, "expression nested too deeply"));
                }
                Ok((Expr::Unary(op, Box::new(e)), d + 1))
            }
            Tok::LParen => {
                let (e, d) = self.expr(0)?;
                self.expect(&Tok::RParen, "`)`")?;
                if d + 1 > MAX_DEPTH {
                    return Err(self.err_at(at, "expression nested too deeply"));
                }
                Ok((e, d + 1))
            }
            Tok::Str(s) => leaf(Expr::Lit(Literal::Str(s))),
            Tok::Num(n) => leaf(Expr::Lit(Literal::Num(n))),
            Tok::True => leaf(Expr::Lit(Literal::Bool(true))),
            Tok::False => leaf(Expr::Lit(Literal::Bool(false))),
            Tok::Null => leaf(Expr::Lit(Literal::Null)),
            Tok::Undefined => leaf(Expr::Lit(Literal::Undefined)),
            Tok::Dollar(name) => {
                self.check_dollar(name, at)?;
                leaf(Expr::Dollar(name.to_owned()))
            }
            Tok::LBrace => {
                let name_at = self.peek_start()?;
                let Tok::Dollar(name) = self.next()? else {
                    return Err(self.err_at(name_at, "expected `$name` after `{`"));
                };
                self.check_dollar(name, name_at)?;
                self.expect(&Tok::RBrace, "`}`")?;
                leaf(Expr::SysOnly(name.to_owned()))
            }
            Tok::Ident(word) if is_reserved(word) => Err(self.err_at(
                at,
                format!("expected an expression, found keyword `{word}`"),
            )),
            Tok::Ident(word) => {
                if self.peek()? == &Tok::LParen {
                    self.next()?;
                    self.call(word, at)
                } else {
                    leaf(Expr::Prop(word.to_owned()))
                }
            }
            other => Err(self.err_at(
                at,
                format!("expected an expression, found {}", other.describe()),
            )),
        }
    }

    fn check_dollar(&self, name: &str, at: usize) -> PResult<()> {
        if let Some(head) = name.get(..4)
            && head.eq_ignore_ascii_case("twin")
        {
            let rest = &name[4..];
            if rest.is_empty() || rest.starts_with('.') || rest.starts_with('[') {
                return Err(self.err_at(at, "`$twin` queries are not supported on IoT Edge"));
            }
        }
        if let Some(path) = body_path_text(name)
            && parse_body_path(path).is_none()
        {
            return Err(self.err_at(at, format!("invalid body path `${name}`")));
        }
        Ok(())
    }

    fn call(&mut self, name: &str, at: usize) -> PResult<(Expr, usize)> {
        if name.eq_ignore_ascii_case("twin_change_includes") {
            let arg_at = self.peek_start()?;
            let path = match self.next()? {
                Tok::Ident(p) | Tok::Dollar(p) => p.to_owned(),
                Tok::Str(p) => p,
                _ => {
                    return Err(self.err_at(
                        arg_at,
                        "expected a property path such as `properties.reported.x`",
                    ));
                }
            };
            if parse_body_path(&format!(".{path}")).is_none() || path.contains('$') {
                return Err(self.err_at(arg_at, format!("invalid property path `{path}`")));
            }
            self.expect(&Tok::RParen, "`)`")?;
            return Ok((Expr::TwinChangeIncludes(path), 1));
        }
        let Some(func) = Func::from_name(name) else {
            return Err(self.err_at(at, format!("unknown function `{name}`")));
        };
        let mut args = Vec::new();
        let mut depth = 1;
        if self.peek()? != &Tok::RParen {
            loop {
                let (e, d) = self.expr(0)?;
                depth = depth.max(d + 1);
                args.push(e);
                if self.peek()? == &Tok::Comma {
                    self.next()?;
                } else {
                    break;
                }
            }
        }
        self.expect(&Tok::RParen, "`,` or `)`")?;
        let (lo, hi) = func.arity();
        if args.len() < lo || hi.is_some_and(|h| args.len() > h) {
            let want = match hi {
                Some(h) if h == lo => format!("{lo}"),
                Some(h) => format!("{lo} to {h}"),
                None => format!("at least {lo}"),
            };
            return Err(self.err_at(
                at,
                format!(
                    "{}() takes {want} argument(s), got {}",
                    func.name(),
                    args.len()
                ),
            ));
        }
        if depth > MAX_DEPTH {
            return Err(self.err_at(at, "expression nested too deeply"));
        }
        Ok((Expr::Call(func, args), depth))
    }

    /// Parses `[SELECT *] FROM <source> [WHERE <condition>] INTO <sink>`.
    pub(crate) fn route(mut self) -> PResult<(String, Option<Expr>, Endpoint)> {
        if self.keyword("select")? {
            self.expect(&Tok::Star, "`*` after SELECT")?;
        }
        if !self.keyword("from")? {
            return Err(self.unexpected("FROM"));
        }
        // The source is raw text up to the next whitespace (it may contain `/*`).
        debug_assert!(self.peeked.is_none());
        let rest = self.rest();
        let trimmed = rest.trim_start();
        self.pos += rest.len() - trimmed.len();
        let src_at = self.pos;
        let len = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        let source = &trimmed[..len];
        if !source.starts_with('/') {
            return Err(self.err_at(src_at, "expected a source path starting with `/`"));
        }
        self.pos += len;
        let condition = if self.keyword("where")? {
            let (e, _) = self.expr(0)?;
            Some(e)
        } else {
            None
        };
        if !self.keyword("into")? {
            return Err(self.unexpected(if condition.is_some() {
                "INTO"
            } else {
                "WHERE or INTO"
            }));
        }
        let sink_at = self.peek_start()?;
        let sink = match self.next()? {
            Tok::Dollar(name) if name.eq_ignore_ascii_case("upstream") => Endpoint::Upstream,
            Tok::Ident(f) if f.eq_ignore_ascii_case("BrokeredEndpoint") => {
                self.expect(&Tok::LParen, "`(`")?;
                let path_at = self.peek_start()?;
                let Tok::Str(path) = self.next()? else {
                    return Err(self.err_at(
                        path_at,
                        "expected a quoted endpoint path \"/modules/<module>/inputs/<input>\"",
                    ));
                };
                let endpoint = Endpoint::from_brokered_path(&path).ok_or_else(|| {
                    self.err_at(
                        path_at,
                        format!(
                            "invalid BrokeredEndpoint path `{path}`; expected \"/modules/<module>/inputs/<input>\""
                        ),
                    )
                })?;
                self.expect(&Tok::RParen, "`)`")?;
                endpoint
            }
            other => {
                return Err(self.err_at(
                    sink_at,
                    format!(
                        "expected $upstream or BrokeredEndpoint(\"/modules/<module>/inputs/<input>\"), found {}",
                        other.describe()
                    ),
                ));
            }
        };
        if self.peek()? != &Tok::Eof {
            return Err(self.unexpected("end of route"));
        }
        Ok((source.to_owned(), condition, sink))
    }
}

/// For a `$name` that is a body query (`body.…` / `body[…]`, any case), the path part after `body`.
pub(crate) fn body_path_text(name: &str) -> Option<&str> {
    let head = name.get(..4)?;
    let rest = &name[4..];
    (head.eq_ignore_ascii_case("body") && (rest.starts_with('.') || rest.starts_with('[')))
        .then_some(rest)
}
