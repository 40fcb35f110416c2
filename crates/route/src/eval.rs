//! Compilation of [`Expr`] trees into evaluable nodes, and their evaluation.

use std::borrow::Cow;

use verge_core::message::{Message, MessageKind, SystemProperty, SystemValue};

use crate::ast::{BinaryOp, Expr, Func, Literal, UnaryOp};
use crate::error::ParseError;
use crate::json::{self, Encoding, Slot, Trie, parse_body_path};
use crate::parse::{Parser, body_path_text};

/// The value of an expression while a condition is evaluated.
///
/// Strings borrow from the message or the compiled condition where possible
/// (`Cow::Borrowed`); only `concat`, `||`, `lower`, `upper`, escaped JSON strings and
/// time-valued system properties produce owned strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// No value (a missing property, a type mismatch, …).
    Undefined,
    /// JSON `null` or the literal `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A number (always a double).
    Num(f64),
    /// A string.
    Str(Cow<'a, str>),
    /// A JSON object or array from the body (only `is_defined` and `??` can use it).
    Complex,
}

impl Value<'_> {
    /// True only for boolean `true`: the one outcome that makes a route match.
    pub fn is_true(&self) -> bool {
        matches!(self, Value::Bool(true))
    }

    fn num(&self) -> Option<f64> {
        match self {
            Value::Num(n) => Some(*n),
            _ => None,
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Const {
    Undefined,
    Null,
    Bool(bool),
    Num(f64),
    Str(Box<str>),
}

impl Const {
    fn value(&self) -> Value<'_> {
        match self {
            Const::Undefined => Value::Undefined,
            Const::Null => Value::Null,
            Const::Bool(b) => Value::Bool(*b),
            Const::Num(n) => Value::Num(*n),
            Const::Str(s) => Value::Str(Cow::Borrowed(s)),
        }
    }

    fn from_value(v: Value<'_>) -> Self {
        match v {
            Value::Undefined | Value::Complex => Const::Undefined,
            Value::Null => Const::Null,
            Value::Bool(b) => Const::Bool(b),
            Value::Num(n) => Const::Num(n),
            Value::Str(s) => Const::Str(s.into()),
        }
    }
}

/// A compiled expression: property names resolved, body paths turned into slots, constants folded.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    Const(Const),
    /// Application property.
    App(Box<str>),
    /// System property.
    Sys(SystemProperty),
    /// Application property `$name` if present, else the system property.
    AppOrSys(Box<str>, SystemProperty),
    /// Application property `$body.…` if present, else the body query.
    AppOrBody(Box<str>, u32),
    /// Body query slot.
    Body(u32),
    /// `twin_change_includes` on a body slot.
    TwinIncludes(u32),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Coalesce(Box<Node>, Box<Node>),
    Bin(BinaryOp, Box<Node>, Box<Node>),
    Call(Func, Box<[Node]>),
}

/// What evaluation reads: the message and, when the condition uses `$body`, the scanned body.
pub(crate) struct Ctx<'a> {
    pub(crate) msg: &'a Message,
    pub(crate) body: Option<BodyView<'a>>,
}

#[derive(Clone, Copy)]
pub(crate) struct BodyView<'a> {
    text: &'a [u8],
    slots: &'a [Slot],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    NotLoaded,
    Unavailable,
    /// Scanned in place in the message body (UTF-8).
    ReadyInPlace,
    /// Scanned in `Scratch::text` (decoded UTF-16/32).
    ReadyDecoded,
}

/// Reusable per-thread working memory for evaluation. After the first few messages it holds
/// enough capacity that evaluation no longer allocates. Keep one per worker and pass it to
/// every call.
#[derive(Debug, Clone)]
pub struct Scratch {
    text: String,
    slots: Vec<Slot>,
    state: BodyState,
    pub(crate) taken: Vec<bool>,
    /// The message's lower-cased source path (`route::source_path`).
    pub(crate) path: Vec<u8>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// Empty scratch space.
    pub fn new() -> Self {
        Self {
            text: String::new(),
            slots: Vec::new(),
            state: BodyState::NotLoaded,
            taken: Vec::new(),
            path: Vec::new(),
        }
    }

    /// Forgets the previous message's body.
    pub(crate) fn reset(&mut self) {
        self.state = BodyState::NotLoaded;
    }

    /// Decodes and scans the body once per message (no-op after the first call).
    pub(crate) fn load(&mut self, msg: &Message, trie: &Trie) {
        if self.state != BodyState::NotLoaded {
            return;
        }
        self.state = BodyState::Unavailable;
        let Some(enc) = body_encoding(msg) else {
            return;
        };
        self.slots.clear();
        self.slots.resize(trie.slot_count(), Slot::Missing);
        if enc == Encoding::Utf8 {
            if json::scan(json::strip_utf8_bom(&msg.body), trie, &mut self.slots).is_ok() {
                self.state = BodyState::ReadyInPlace;
            }
            return;
        }
        if json::decode_body(&msg.body, enc, &mut self.text).is_err() {
            return;
        }
        if json::scan(self.text.as_bytes(), trie, &mut self.slots).is_ok() {
            self.state = BodyState::ReadyDecoded;
        }
    }

    pub(crate) fn view<'a>(&'a self, msg: &'a Message) -> Option<BodyView<'a>> {
        let text = match self.state {
            BodyState::ReadyInPlace => json::strip_utf8_bom(&msg.body),
            BodyState::ReadyDecoded => self.text.as_bytes(),
            BodyState::NotLoaded | BodyState::Unavailable => return None,
        };
        Some(BodyView {
            text,
            slots: &self.slots,
        })
    }
}

/// `$body` is readable when contentType is `application/json` and contentEncoding is
/// utf-8/16/32 (case-insensitive). Twin change notifications are generated by the hub as JSON,
/// so when they carry no contentType they are read as UTF-8 JSON.
fn body_encoding(msg: &Message) -> Option<Encoding> {
    let sys = &msg.system;
    match (&sys.content_type, &sys.content_encoding) {
        (None, enc) if msg.kind == MessageKind::TwinChangeNotification => match enc {
            None => Some(Encoding::Utf8),
            Some(e) => Encoding::from_name(e),
        },
        // The exact spelling first: one length check and compare, before the case-folding one.
        (Some(ct), Some(enc))
            if ct == "application/json" || ct.eq_ignore_ascii_case("application/json") =>
        {
            Encoding::from_name(enc)
        }
        _ => None,
    }
}

/// Compiles AST nodes, registering body paths in `trie`.
pub(crate) struct Compiler<'t> {
    pub(crate) trie: &'t mut Trie,
    pub(crate) uses_body: bool,
}

impl Compiler<'_> {
    pub(crate) fn compile(&mut self, e: &Expr) -> Node {
        let node = match e {
            Expr::Lit(l) => Node::Const(match l {
                Literal::Str(s) => Const::Str(s.as_str().into()),
                Literal::Num(n) => Const::Num(*n),
                Literal::Bool(b) => Const::Bool(*b),
                Literal::Null => Const::Null,
                Literal::Undefined => Const::Undefined,
            }),
            Expr::Prop(name) => Node::App(name.as_str().into()),
            Expr::Dollar(name) => {
                let app: Box<str> = format!("${name}").into();
                if let Some(slot) = self.body_slot(name) {
                    if name.contains(['[', ']']) {
                        Node::Body(slot)
                    } else {
                        Node::AppOrBody(app, slot)
                    }
                } else if name.contains(['[', ']']) {
                    Node::Const(Const::Undefined)
                } else {
                    match SystemProperty::from_route_name(name) {
                        Some(p) => Node::AppOrSys(app, p),
                        None => Node::App(app),
                    }
                }
            }
            Expr::SysOnly(name) => match self.body_slot(name) {
                Some(slot) => Node::Body(slot),
                None => match SystemProperty::from_route_name(name) {
                    Some(p) if !name.contains(['[', ']']) => Node::Sys(p),
                    _ => Node::Const(Const::Undefined),
                },
            },
            Expr::TwinChangeIncludes(path) => match parse_body_path(&format!(".{path}")) {
                Some(segs) => {
                    self.uses_body = true;
                    Node::TwinIncludes(self.trie.insert(&segs))
                }
                None => Node::Const(Const::Undefined),
            },
            Expr::Unary(op, inner) => {
                let inner = Box::new(self.compile(inner));
                match op {
                    UnaryOp::Not => Node::Not(inner),
                    UnaryOp::Neg => Node::Neg(inner),
                }
            }
            Expr::Binary(op, l, r) => {
                let l = Box::new(self.compile(l));
                let r = Box::new(self.compile(r));
                match op {
                    BinaryOp::And => Node::And(l, r),
                    BinaryOp::Or => Node::Or(l, r),
                    BinaryOp::Coalesce => Node::Coalesce(l, r),
                    op => Node::Bin(*op, l, r),
                }
            }
            Expr::Call(f, args) => Node::Call(*f, args.iter().map(|a| self.compile(a)).collect()),
        };
        fold(node)
    }

    fn body_slot(&mut self, name: &str) -> Option<u32> {
        let path = parse_body_path(body_path_text(name)?)?;
        self.uses_body = true;
        Some(self.trie.insert(&path))
    }
}

/// Replaces an operator whose operands are all constants by its value.
fn fold(node: Node) -> Node {
    let is_const = |n: &Node| matches!(n, Node::Const(_));
    let foldable = match &node {
        Node::Not(a) | Node::Neg(a) => is_const(a),
        Node::And(a, b) | Node::Or(a, b) | Node::Coalesce(a, b) | Node::Bin(_, a, b) => {
            is_const(a) && is_const(b)
        }
        Node::Call(_, args) => args.iter().all(is_const),
        _ => false,
    };
    if !foldable {
        return node;
    }
    let msg = Message::default();
    let cx = Ctx {
        msg: &msg,
        body: None,
    };
    Node::Const(Const::from_value(node.eval(&cx)))
}

fn sys_value(v: SystemValue<'_>) -> Value<'_> {
    match v {
        SystemValue::Str(s) => Value::Str(Cow::Borrowed(s)),
        SystemValue::Time(t) => Value::Str(Cow::Owned(t.to_iso8601())),
    }
}

impl Node {
    /// [`Node::eval`] with a constant operand (`x < 10`, `m = 'sensor'`) read in line rather
    /// than through a recursive call.
    #[inline(always)]
    fn eval_operand<'a>(&'a self, cx: &Ctx<'a>) -> Value<'a> {
        match self {
            Node::Const(c) => c.value(),
            n => n.eval(cx),
        }
    }

    pub(crate) fn eval<'a>(&'a self, cx: &Ctx<'a>) -> Value<'a> {
        match self {
            Node::Const(c) => c.value(),
            Node::App(name) => match cx.msg.properties.get(name) {
                Some(v) => Value::Str(Cow::Borrowed(v)),
                None => Value::Undefined,
            },
            Node::Sys(p) => cx.msg.system.get(*p).map_or(Value::Undefined, sys_value),
            Node::AppOrSys(name, p) => match cx.msg.properties.get(name) {
                Some(v) => Value::Str(Cow::Borrowed(v)),
                None => cx.msg.system.get(*p).map_or(Value::Undefined, sys_value),
            },
            Node::AppOrBody(name, slot) => match cx.msg.properties.get(name) {
                Some(v) => Value::Str(Cow::Borrowed(v)),
                None => body_value(cx, *slot),
            },
            Node::Body(slot) => body_value(cx, *slot),
            Node::TwinIncludes(slot) => {
                if cx.msg.kind != MessageKind::TwinChangeNotification {
                    return Value::Undefined;
                }
                match cx.body {
                    None => Value::Undefined,
                    Some(b) => Value::Bool(
                        b.slots
                            .get(*slot as usize)
                            .is_some_and(|s| *s != Slot::Missing),
                    ),
                }
            }
            Node::Not(a) => match a.eval(cx) {
                Value::Bool(b) => Value::Bool(!b),
                _ => Value::Undefined,
            },
            Node::Neg(a) => match a.eval(cx) {
                Value::Num(n) => Value::Num(-n),
                _ => Value::Undefined,
            },
            Node::And(a, b) => {
                let l = a.eval(cx);
                if matches!(l, Value::Bool(false)) {
                    return l;
                }
                match (l, b.eval(cx)) {
                    (_, Value::Bool(false)) => Value::Bool(false),
                    (Value::Bool(true), Value::Bool(true)) => Value::Bool(true),
                    _ => Value::Undefined,
                }
            }
            Node::Or(a, b) => {
                let l = a.eval(cx);
                if matches!(l, Value::Bool(true)) {
                    return l;
                }
                match (l, b.eval(cx)) {
                    (_, Value::Bool(true)) => Value::Bool(true),
                    (Value::Bool(false), Value::Bool(false)) => Value::Bool(false),
                    _ => Value::Undefined,
                }
            }
            Node::Coalesce(a, b) => match a.eval(cx) {
                Value::Undefined => b.eval(cx),
                v => v,
            },
            Node::Bin(op, a, b) => binary(*op, a.eval_operand(cx), b.eval_operand(cx)),
            Node::Call(f, args) => call(*f, args, cx),
        }
    }
}

fn body_value<'a>(cx: &Ctx<'a>, slot: u32) -> Value<'a> {
    let Some(body) = cx.body else {
        return Value::Undefined;
    };
    match body.slots.get(slot as usize) {
        None | Some(Slot::Missing) => Value::Undefined,
        Some(Slot::Null) => Value::Null,
        Some(Slot::Bool(b)) => Value::Bool(*b),
        Some(Slot::Num(n)) => Value::Num(*n),
        Some(Slot::Complex) => Value::Complex,
        Some(Slot::Str {
            start,
            end,
            escaped,
        }) => {
            let raw = body
                .text
                .get(*start as usize..*end as usize)
                .unwrap_or_default();
            let raw = String::from_utf8_lossy(raw);
            if *escaped {
                Value::Str(Cow::Owned(json::unescape(&raw)))
            } else {
                Value::Str(raw)
            }
        }
    }
}

fn binary<'a>(op: BinaryOp, l: Value<'a>, r: Value<'a>) -> Value<'a> {
    use std::cmp::Ordering;
    match op {
        BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
            let ord: Option<Ordering> = match (&l, &r) {
                (Value::Num(a), Value::Num(b)) => a.partial_cmp(b),
                (Value::Str(a), Value::Str(b)) => Some(a.as_ref().cmp(b.as_ref())),
                (Value::Bool(a), Value::Bool(b)) if matches!(op, BinaryOp::Eq | BinaryOp::Ne) => {
                    Some(a.cmp(b))
                }
                (Value::Null, Value::Null) if matches!(op, BinaryOp::Eq | BinaryOp::Ne) => {
                    Some(Ordering::Equal)
                }
                _ => return Value::Undefined,
            };
            let result = match (op, ord) {
                (BinaryOp::Ne, None) => true,
                (_, None) => false,
                (BinaryOp::Eq, Some(o)) => o == Ordering::Equal,
                (BinaryOp::Ne, Some(o)) => o != Ordering::Equal,
                (BinaryOp::Lt, Some(o)) => o == Ordering::Less,
                (BinaryOp::Le, Some(o)) => o != Ordering::Greater,
                (BinaryOp::Gt, Some(o)) => o == Ordering::Greater,
                (_, Some(o)) => o != Ordering::Less,
            };
            Value::Bool(result)
        }
        BinaryOp::Concat => match (l, r) {
            (Value::Str(a), Value::Str(b)) => {
                let mut s = a.into_owned();
                s.push_str(&b);
                Value::Str(Cow::Owned(s))
            }
            _ => Value::Undefined,
        },
        _ => {
            let (Some(a), Some(b)) = (l.num(), r.num()) else {
                return Value::Undefined;
            };
            Value::Num(match op {
                BinaryOp::Add => a + b,
                BinaryOp::Sub => a - b,
                BinaryOp::Mul => a * b,
                BinaryOp::Div => a / b,
                _ => a % b,
            })
        }
    }
}

fn num_result(n: f64) -> Value<'static> {
    if n.is_nan() {
        Value::Undefined
    } else {
        Value::Num(n)
    }
}

/// Parses a string as a number for `as_number`: optional surrounding whitespace, decimal
/// digits with optional sign, fraction and exponent. `inf`/`nan` are not numbers.
fn parse_number(s: &str) -> Option<f64> {
    // `trim` only when an end may be whitespace: both ends printable ASCII is the usual case.
    let t = match s.as_bytes() {
        [first, .., last] if first.is_ascii_graphic() && last.is_ascii_graphic() => s,
        [only] if only.is_ascii_graphic() => s,
        _ => s.trim(),
    };
    // The fast path's shape is a subset of what the checks below accept, with the same result.
    if let Some(v) = json::fast_decimal(t.as_bytes()) {
        return Some(v);
    }
    if t.is_empty()
        || !t.bytes().any(|b| b.is_ascii_digit())
        || !t
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
    {
        return None;
    }
    t.parse().ok()
}

fn char_to_byte(s: &str, chars: usize) -> Option<usize> {
    if chars == 0 {
        return Some(0);
    }
    s.char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(s.len()))
        .nth(chars)
}

fn substring<'a>(s: Cow<'a, str>, start: f64, len: Option<f64>) -> Value<'a> {
    let count = s.chars().count() as f64;
    let whole = |x: f64| x.fract() == 0.0 && x >= 0.0;
    if !whole(start) || start > count || len.is_some_and(|l| !whole(l) || start + l > count) {
        return Value::Undefined;
    }
    let from = start as usize;
    let to = len.map_or(count as usize, |l| from + l as usize);
    let (Some(a), Some(b)) = (char_to_byte(&s, from), char_to_byte(&s, to)) else {
        return Value::Undefined;
    };
    match s {
        Cow::Borrowed(b_) => Value::Str(Cow::Borrowed(&b_[a..b])),
        Cow::Owned(o) => Value::Str(Cow::Owned(o[a..b].to_owned())),
    }
}

fn call<'a>(f: Func, args: &'a [Node], cx: &Ctx<'a>) -> Value<'a> {
    let arg = |i: usize| args.get(i).map_or(Value::Undefined, |n| n.eval(cx));
    let math = |g: fn(f64) -> f64| match arg(0).num() {
        Some(x) => num_result(g(x)),
        None => Value::Undefined,
    };
    let strs = |g: fn(&str, &str) -> bool| {
        let (a, b) = (arg(0), arg(1));
        match (a.str(), b.str()) {
            (Some(x), Some(y)) => Value::Bool(g(x, y)),
            _ => Value::Undefined,
        }
    };
    match f {
        Func::Abs => math(f64::abs),
        Func::Exp => math(f64::exp),
        Func::Square => math(|x| x * x),
        Func::Ceiling => math(f64::ceil),
        Func::Floor => math(f64::floor),
        Func::Sqrt => math(f64::sqrt),
        Func::Sign => math(|x| {
            if x.is_nan() {
                f64::NAN
            } else if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }),
        Func::Power => match (arg(0).num(), arg(1).num()) {
            (Some(x), Some(y)) => num_result(x.powf(y)),
            _ => Value::Undefined,
        },
        Func::AsNumber => match arg(0) {
            Value::Num(n) => Value::Num(n),
            Value::Str(s) => parse_number(&s).map_or(Value::Undefined, Value::Num),
            _ => Value::Undefined,
        },
        Func::IsBool => Value::Bool(matches!(arg(0), Value::Bool(_))),
        Func::IsDefined => Value::Bool(!matches!(arg(0), Value::Undefined)),
        Func::IsNull => Value::Bool(matches!(arg(0), Value::Null)),
        Func::IsNumber => Value::Bool(matches!(arg(0), Value::Num(_))),
        Func::IsString => Value::Bool(matches!(arg(0), Value::Str(_))),
        Func::Concat => {
            let mut out = String::new();
            for a in args {
                match a.eval(cx) {
                    Value::Str(s) => out.push_str(&s),
                    _ => return Value::Undefined,
                }
            }
            Value::Str(Cow::Owned(out))
        }
        Func::Length => match arg(0) {
            Value::Str(s) => Value::Num(s.chars().count() as f64),
            _ => Value::Undefined,
        },
        Func::Lower => match arg(0) {
            Value::Str(s) => Value::Str(Cow::Owned(s.to_lowercase())),
            _ => Value::Undefined,
        },
        Func::Upper => match arg(0) {
            Value::Str(s) => Value::Str(Cow::Owned(s.to_uppercase())),
            _ => Value::Undefined,
        },
        Func::Substring => {
            let len = if args.len() > 2 {
                match arg(2).num() {
                    Some(l) => Some(l),
                    None => return Value::Undefined,
                }
            } else {
                None
            };
            match (arg(0), arg(1).num()) {
                (Value::Str(s), Some(start)) => substring(s, start, len),
                _ => Value::Undefined,
            }
        }
        Func::IndexOf => {
            let (a, b) = (arg(0), arg(1));
            match (a.str(), b.str()) {
                (Some(x), Some(y)) => {
                    Value::Num(x.find(y).map_or(-1.0, |i| x[..i].chars().count() as f64))
                }
                _ => Value::Undefined,
            }
        }
        Func::StartsWith => strs(|x, y| x.starts_with(y)),
        Func::EndsWith => strs(|x, y| x.ends_with(y)),
        Func::Contains => strs(|x, y| x.contains(y)),
    }
}

/// A compiled WHERE condition.
#[derive(Debug, Clone)]
pub struct Condition {
    expr: Expr,
    node: Node,
    trie: Trie,
    uses_body: bool,
}

impl Condition {
    /// Parses and compiles a condition (the text after WHERE).
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        Ok(Self::from_expr(Parser::new(text).condition()?))
    }

    /// Compiles an already parsed expression.
    pub fn from_expr(expr: Expr) -> Self {
        let mut trie = Trie::default();
        let mut c = Compiler {
            trie: &mut trie,
            uses_body: false,
        };
        let node = c.compile(&expr);
        let uses_body = c.uses_body;
        Self {
            expr,
            node,
            trie,
            uses_body,
        }
    }

    /// The parsed expression.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }

    /// True when the condition reads the body (`$body…` or `twin_change_includes`).
    pub fn uses_body(&self) -> bool {
        self.uses_body
    }

    /// Evaluates the condition against `msg`.
    pub fn evaluate<'a>(&'a self, msg: &'a Message, scratch: &'a mut Scratch) -> Value<'a> {
        scratch.reset();
        if self.uses_body {
            scratch.load(msg, &self.trie);
        }
        let cx = Ctx {
            msg,
            body: scratch.view(msg),
        };
        self.node.eval(&cx)
    }

    /// True when the condition evaluates to boolean `true`.
    pub fn matches(&self, msg: &Message, scratch: &mut Scratch) -> bool {
        self.evaluate(msg, scratch).is_true()
    }
}
