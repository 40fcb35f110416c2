//! `$body` support: body paths, a path trie, and a one-pass, allocation-free JSON scanner that
//! validates the whole body and extracts every path a route set needs in a single walk.

/// One step of a body path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    /// `.name` or `['name']`.
    Key(Box<str>),
    /// `[n]`.
    Index(u32),
}

/// Parses `.a.b[0]['c']` (the part of `$body.a.b[0]` after `body`). `None` when malformed or empty.
pub(crate) fn parse_body_path(mut s: &str) -> Option<Vec<Seg>> {
    let mut out = Vec::new();
    while !s.is_empty() {
        if let Some(rest) = s.strip_prefix('.') {
            let end = rest.find(['.', '[', ']']).unwrap_or(rest.len());
            if end == 0 {
                return None;
            }
            out.push(Seg::Key(rest[..end].into()));
            s = &rest[end..];
        } else if let Some(rest) = s.strip_prefix("['") {
            let end = rest.find("']")?;
            out.push(Seg::Key(rest[..end].into()));
            s = &rest[end + 2..];
        } else if let Some(rest) = s.strip_prefix('[') {
            let end = rest.find(']')?;
            let n: u32 = rest[..end].trim().parse().ok()?;
            out.push(Seg::Index(n));
            s = &rest[end + 1..];
        } else {
            return None;
        }
    }
    (!out.is_empty()).then_some(out)
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    children: Vec<(Seg, u32)>,
    slot: Option<u32>,
}

/// Every body path a program reads, merged into a trie; each distinct path owns one result slot.
#[derive(Debug, Clone)]
pub(crate) struct Trie {
    nodes: Vec<TrieNode>,
    slots: u32,
}

impl Default for Trie {
    fn default() -> Self {
        Self {
            nodes: vec![TrieNode::default()],
            slots: 0,
        }
    }
}

impl Trie {
    /// The slot of `path`, adding it if new.
    pub(crate) fn insert(&mut self, path: &[Seg]) -> u32 {
        let mut n = 0usize;
        for seg in path {
            let found = self.nodes[n]
                .children
                .iter()
                .find(|(s, _)| s == seg)
                .map(|&(_, c)| c as usize);
            n = match found {
                Some(c) => c,
                None => {
                    let c = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[n].children.push((seg.clone(), c as u32));
                    c
                }
            };
        }
        match self.nodes[n].slot {
            Some(s) => s,
            None => {
                let s = self.slots;
                self.slots += 1;
                self.nodes[n].slot = Some(s);
                s
            }
        }
    }

    /// Number of slots.
    pub(crate) fn slot_count(&self) -> usize {
        self.slots as usize
    }
}

/// What the scanner found at one path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Slot {
    /// Not present.
    Missing,
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Num(f64),
    /// A string: byte range of its raw contents (between the quotes) and whether it has escapes.
    Str { start: u32, end: u32, escaped: bool },
    /// An object or array.
    Complex,
}

const MAX_JSON_DEPTH: u32 = 128;

/// Exact powers of ten: every one up to 10^22 is a double.
const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// Parses `[+-]digits[.digits]` (at least one digit, at most 15 in all), the shape nearly every
/// telemetry number has, without the general decimal parser. The mantissa (< 10^15 < 2^53) and
/// the power of ten are both exact doubles, so the one correctly rounded division gives exactly
/// what `str::parse::<f64>` gives (Clinger's fast path). `None` for anything else: callers fall
/// back to `str::parse`.
pub(crate) fn fast_decimal(text: &[u8]) -> Option<f64> {
    let (neg, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        rest => (false, rest),
    };
    let mut mantissa = 0u64;
    let mut count = 0usize;
    let mut point: Option<usize> = None;
    for &c in digits {
        match c {
            b'0'..=b'9' => {
                count += 1;
                if count > 15 {
                    return None;
                }
                mantissa = mantissa * 10 + u64::from(c - b'0');
            }
            b'.' if point.is_none() => point = Some(count),
            _ => return None,
        }
    }
    if count == 0 {
        return None;
    }
    let scale = POW10.get(count - point.unwrap_or(count))?;
    let v = mantissa as f64 / scale;
    Some(if neg { -v } else { v })
}

/// High bit set in each byte of `w` (little-endian lanes) that ends a run of plain string
/// contents: `"`, `\` or a control character. Borrows only travel upwards from a byte that
/// matched, so the lowest set bit is always exact (higher ones may be spurious).
#[inline(always)]
fn string_stops(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x;
    let quote = zero_byte(w ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(w ^ (ONES * u64::from(b'\\')));
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    (quote | backslash | control) & HIGH
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    trie: &'a Trie,
    slots: &'a mut [Slot],
}

/// Validates `text` as one JSON value and fills `slots` (which must be `trie.slot_count()` long,
/// preset to `Missing`). `Err` on malformed JSON.
/// Works on bytes: strings are not UTF-8-checked here (values are decoded lossily when read,
/// as .NET's decoder does).
///
/// Subtrees no path reaches are only validated (`skip`), strings are searched eight bytes at a
/// time, and only numbers that land in a slot are converted.
pub(crate) fn scan(text: &[u8], trie: &Trie, slots: &mut [Slot]) -> Result<(), ()> {
    if text.len() > u32::MAX as usize {
        return Err(());
    }
    let mut s = Scanner {
        b: text,
        i: 0,
        trie,
        slots,
    };
    s.value(0, 0)?;
    s.ws();
    if s.i == s.b.len() { Ok(()) } else { Err(()) }
}

impl<'a> Scanner<'a> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// The next byte after whitespace, consumed.
    #[inline(always)]
    fn token(&mut self) -> Option<u8> {
        self.ws();
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn record(&mut self, slot: Option<u32>, v: Slot) {
        if let Some(s) = slot
            && let Some(out) = self.slots.get_mut(s as usize)
        {
            *out = v;
        }
    }

    /// A value at trie node `node`: recorded in its slot, children followed.
    fn value(&mut self, node: u32, depth: u32) -> Result<(), ()> {
        let trie = self.trie;
        let Some(n) = trie.nodes.get(node as usize) else {
            return self.skip(depth);
        };
        if n.children.is_empty() && n.slot.is_none() {
            return self.skip(depth);
        }
        if depth > MAX_JSON_DEPTH {
            return Err(());
        }
        let parent = (!n.children.is_empty()).then_some(n);
        match self.token().ok_or(())? {
            b'{' => {
                self.record(n.slot, Slot::Complex);
                self.object(depth, parent)
            }
            b'[' => {
                self.record(n.slot, Slot::Complex);
                self.array(depth, parent)
            }
            b'"' => {
                let (start, end, escaped) = self.string()?;
                self.record(
                    n.slot,
                    Slot::Str {
                        start: start as u32,
                        end: end as u32,
                        escaped,
                    },
                );
                Ok(())
            }
            b't' => self.literal(b"rue", n.slot, Slot::Bool(true)),
            b'f' => self.literal(b"alse", n.slot, Slot::Bool(false)),
            b'n' => self.literal(b"ull", n.slot, Slot::Null),
            c @ (b'-' | b'0'..=b'9') => {
                let start = self.i - 1;
                self.number(c)?;
                if n.slot.is_some() {
                    let text = &self.b[start..self.i];
                    let v = match fast_decimal(text) {
                        Some(v) => v,
                        None => std::str::from_utf8(text)
                            .map_err(|_| ())?
                            .parse()
                            .map_err(|_| ())?,
                    };
                    self.record(n.slot, Slot::Num(v));
                }
                Ok(())
            }
            _ => Err(()),
        }
    }

    /// A value nothing reads: validated only.
    fn skip(&mut self, depth: u32) -> Result<(), ()> {
        if depth > MAX_JSON_DEPTH {
            return Err(());
        }
        match self.token().ok_or(())? {
            b'{' => self.object(depth, None),
            b'[' => self.array(depth, None),
            b'"' => self.string().map(drop),
            b't' => self.literal(b"rue", None, Slot::Missing),
            b'f' => self.literal(b"alse", None, Slot::Missing),
            b'n' => self.literal(b"ull", None, Slot::Missing),
            c @ (b'-' | b'0'..=b'9') => self.number(c),
            _ => Err(()),
        }
    }

    /// The members of an object whose `{` was just read; `parent` when some path goes deeper.
    fn object(&mut self, depth: u32, parent: Option<&'a TrieNode>) -> Result<(), ()> {
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            if self.token() != Some(b'"') {
                return Err(());
            }
            let (ks, ke, kesc) = self.string()?;
            if self.token() != Some(b':') {
                return Err(());
            }
            match parent.and_then(|p| self.child_by_key(p, ks, ke, kesc)) {
                Some(child) => self.value(child, depth + 1)?,
                None => self.skip(depth + 1)?,
            }
            match self.token() {
                Some(b',') => {}
                Some(b'}') => return Ok(()),
                _ => return Err(()),
            }
        }
    }

    /// The elements of an array whose `[` was just read; `parent` when some path goes deeper.
    fn array(&mut self, depth: u32, parent: Option<&'a TrieNode>) -> Result<(), ()> {
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        let mut index = 0u32;
        loop {
            let child = parent.and_then(|p| {
                p.children.iter().find_map(|(s, c)| match s {
                    Seg::Index(k) if *k == index => Some(*c),
                    _ => None,
                })
            });
            match child {
                Some(child) => self.value(child, depth + 1)?,
                None => self.skip(depth + 1)?,
            }
            index = index.saturating_add(1);
            match self.token() {
                Some(b',') => {}
                Some(b']') => return Ok(()),
                _ => return Err(()),
            }
        }
    }

    /// The rest of `true`/`false`/`null` after its first letter.
    fn literal(&mut self, rest: &[u8], slot: Option<u32>, v: Slot) -> Result<(), ()> {
        if self.b.get(self.i..self.i + rest.len()) == Some(rest) {
            self.i += rest.len();
            self.record(slot, v);
            Ok(())
        } else {
            Err(())
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.b.get(self.i) {
            self.i += 1;
        }
        self.i - start
    }

    /// The rest of a number whose first byte (`-` or a digit) was just read.
    fn number(&mut self, first: u8) -> Result<(), ()> {
        let lead = if first == b'-' {
            let c = self.peek().ok_or(())?;
            self.i += 1;
            c
        } else {
            first
        };
        match lead {
            b'0' => {}
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return Err(()),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(());
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(());
            }
        }
        Ok(())
    }

    /// After an opening quote: returns the raw contents' range and whether escapes occur.
    fn string(&mut self) -> Result<(usize, usize, bool), ()> {
        let start = self.i;
        let mut escaped = false;
        loop {
            // Plain bytes eight at a time; the last few (fewer than eight) one by one below.
            while let Some(chunk) = self.b.get(self.i..).and_then(<[u8]>::first_chunk::<8>) {
                let stops = string_stops(u64::from_le_bytes(*chunk));
                if stops != 0 {
                    self.i += (stops.trailing_zeros() / 8) as usize;
                    break;
                }
                self.i += 8;
            }
            match self.peek().ok_or(())? {
                b'"' => {
                    let end = self.i;
                    self.i += 1;
                    return Ok((start, end, escaped));
                }
                b'\\' => {
                    escaped = true;
                    match self.b.get(self.i + 1).ok_or(())? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                        b'u' => {
                            let hex = self.b.get(self.i + 2..self.i + 6).ok_or(())?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return Err(());
                            }
                            self.i += 6;
                        }
                        _ => return Err(()),
                    }
                }
                c if c < 0x20 => return Err(()),
                _ => self.i += 1,
            }
        }
    }

    fn child_by_key(
        &self,
        parent: &TrieNode,
        start: usize,
        end: usize,
        escaped: bool,
    ) -> Option<u32> {
        let raw = self.b.get(start..end)?;
        if !escaped {
            return parent.children.iter().find_map(|(s, c)| match s {
                Seg::Key(k) if k.as_bytes() == raw => Some(*c),
                _ => None,
            });
        }
        let key = unescape(&String::from_utf8_lossy(raw));
        parent.children.iter().find_map(|(s, c)| match s {
            Seg::Key(k) if **k == *key => Some(*c),
            _ => None,
        })
    }
}

#[cfg(test)]
mod oracle;

/// Decodes the contents of a (validated) JSON string literal. Allocates.
pub(crate) fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    let mut pending_high: Option<u32> = None;
    while let Some(c) = chars.next() {
        if c != '\\' {
            if pending_high.take().is_some() {
                out.push('\u{fffd}');
            }
            out.push(c);
            continue;
        }
        let e = chars.next().unwrap_or('\\');
        if e != 'u' && pending_high.take().is_some() {
            out.push('\u{fffd}');
        }
        match e {
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'u' => {
                let hex: String = chars.by_ref().take(4).collect();
                let cp = u32::from_str_radix(&hex, 16).unwrap_or(0xfffd);
                match (pending_high.take(), cp) {
                    (Some(hi), 0xdc00..=0xdfff) => {
                        let c = 0x10000 + ((hi - 0xd800) << 10) + (cp - 0xdc00);
                        out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                    }
                    (prev, 0xd800..=0xdbff) => {
                        if prev.is_some() {
                            out.push('\u{fffd}');
                        }
                        pending_high = Some(cp);
                    }
                    (prev, cp) => {
                        if prev.is_some() {
                            out.push('\u{fffd}');
                        }
                        out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                    }
                }
            }
            other => out.push(other),
        }
    }
    if pending_high.is_some() {
        out.push('\u{fffd}');
    }
    out
}

/// The body encodings `$body` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Utf8,
    Utf16,
    Utf32,
}

impl Encoding {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("utf-8") {
            Some(Self::Utf8)
        } else if name.eq_ignore_ascii_case("utf-16") {
            Some(Self::Utf16)
        } else if name.eq_ignore_ascii_case("utf-32") {
            Some(Self::Utf32)
        } else {
            None
        }
    }
}

/// The UTF-8 body without its byte-order mark, if any.
pub(crate) fn strip_utf8_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// Decodes a UTF-16/32 `body` into `out` (cleared first), honouring a byte-order mark and
/// defaulting to little-endian (.NET's `Encoding.Unicode` / `Encoding.UTF32`). `Err` on invalid
/// input. UTF-8 bodies are scanned in place instead.
pub(crate) fn decode_body(body: &[u8], enc: Encoding, out: &mut String) -> Result<(), ()> {
    out.clear();
    match enc {
        Encoding::Utf8 => out.push_str(&String::from_utf8_lossy(strip_utf8_bom(body))),
        Encoding::Utf16 => {
            let (b, be) = match body {
                [0xFE, 0xFF, rest @ ..] => (rest, true),
                [0xFF, 0xFE, rest @ ..] => (rest, false),
                _ => (body, false),
            };
            if b.len() % 2 != 0 {
                return Err(());
            }
            let units = b.chunks_exact(2).map(|c| {
                if be {
                    u16::from_be_bytes([c[0], c[1]])
                } else {
                    u16::from_le_bytes([c[0], c[1]])
                }
            });
            for c in char::decode_utf16(units) {
                out.push(c.map_err(|_| ())?);
            }
        }
        Encoding::Utf32 => {
            let (b, be) = match body {
                [0, 0, 0xFE, 0xFF, rest @ ..] => (rest, true),
                [0xFF, 0xFE, 0, 0, rest @ ..] => (rest, false),
                _ => (body, false),
            };
            if b.len() % 4 != 0 {
                return Err(());
            }
            for c in b.chunks_exact(4) {
                let arr = [c[0], c[1], c[2], c[3]];
                let v = if be {
                    u32::from_be_bytes(arr)
                } else {
                    u32::from_le_bytes(arr)
                };
                out.push(char::from_u32(v).ok_or(())?);
            }
        }
    }
    Ok(())
}
