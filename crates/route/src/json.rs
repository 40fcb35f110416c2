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
/// Subtrees no path reaches are only validated ([`skip`]), strings are searched eight bytes at
/// a time, and only numbers that land in a slot are converted.
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
    // Only whitespace may follow.
    match token(text, &mut s.i) {
        None => Ok(()),
        Some(_) => Err(()),
    }
}

// The lexical steps below are free functions over (bytes, index) rather than methods so that
// the index lives in a register through the skip loop.

/// The next byte after whitespace, consumed.
#[inline(always)]
fn token(b: &[u8], i: &mut usize) -> Option<u8> {
    loop {
        let c = *b.get(*i)?;
        *i += 1;
        // One comparison for the usual case: anything above a space is not whitespace.
        if c > b' ' || !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            return Some(c);
        }
    }
}

/// Like [`token`], but consumes the byte only when it is `c`.
#[inline(always)]
fn token_if(b: &[u8], i: &mut usize, c: u8) -> bool {
    let mut j = *i;
    if token(b, &mut j) == Some(c) {
        *i = j;
        true
    } else {
        false
    }
}

/// After an opening quote: the raw contents' range and whether escapes occur.
#[inline(always)]
fn string(b: &[u8], i: &mut usize) -> Result<(usize, usize, bool), ()> {
    let start = *i;
    let mut escaped = false;
    loop {
        // Plain bytes eight at a time; the last few (fewer than eight) one by one below.
        while let Some(chunk) = b.get(*i..).and_then(<[u8]>::first_chunk::<8>) {
            let stops = string_stops(u64::from_le_bytes(*chunk));
            if stops != 0 {
                *i += (stops.trailing_zeros() / 8) as usize;
                break;
            }
            *i += 8;
        }
        match *b.get(*i).ok_or(())? {
            b'"' => {
                let end = *i;
                *i += 1;
                return Ok((start, end, escaped));
            }
            b'\\' => {
                escaped = true;
                match b.get(*i + 1).ok_or(())? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => *i += 2,
                    b'u' => {
                        let hex = b.get(*i + 2..*i + 6).ok_or(())?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return Err(());
                        }
                        *i += 6;
                    }
                    _ => return Err(()),
                }
            }
            c if c < 0x20 => return Err(()),
            _ => *i += 1,
        }
    }
}

#[inline(always)]
fn digits(b: &[u8], i: &mut usize) -> usize {
    let start = *i;
    while let Some(b'0'..=b'9') = b.get(*i) {
        *i += 1;
    }
    *i - start
}

/// The rest of a number whose first byte (`-` or a digit) was just read.
#[inline(always)]
fn number(b: &[u8], i: &mut usize, first: u8) -> Result<(), ()> {
    let lead = if first == b'-' {
        let c = *b.get(*i).ok_or(())?;
        *i += 1;
        c
    } else {
        first
    };
    match lead {
        b'0' => {}
        b'1'..=b'9' => {
            digits(b, i);
        }
        _ => return Err(()),
    }
    if b.get(*i) == Some(&b'.') {
        *i += 1;
        if digits(b, i) == 0 {
            return Err(());
        }
    }
    if let Some(b'e' | b'E') = b.get(*i) {
        *i += 1;
        if let Some(b'+' | b'-') = b.get(*i) {
            *i += 1;
        }
        if digits(b, i) == 0 {
            return Err(());
        }
    }
    Ok(())
}

/// The rest of `true`/`false`/`null` after its first letter.
#[inline(always)]
fn literal(b: &[u8], i: &mut usize, rest: &[u8]) -> Result<(), ()> {
    if b.get(*i..*i + rest.len()) == Some(rest) {
        *i += rest.len();
        Ok(())
    } else {
        Err(())
    }
}

/// `"key":` of an object member whose key nothing reads.
#[inline(always)]
fn key(b: &[u8], i: &mut usize) -> Result<(), ()> {
    if token(b, i) != Some(b'"') {
        return Err(());
    }
    string(b, i)?;
    if token(b, i) != Some(b':') {
        return Err(());
    }
    Ok(())
}

/// [`skip`] with the common case, a string or number, handled in line without the call and
/// its container stack.
#[inline(always)]
fn skip_value(b: &[u8], i: &mut usize, depth: u32) -> Result<(), ()> {
    if depth > MAX_JSON_DEPTH {
        return Err(());
    }
    let mut j = *i;
    match token(b, &mut j) {
        Some(b'"') => {
            string(b, &mut j)?;
        }
        Some(c @ (b'-' | b'0'..=b'9')) => number(b, &mut j, c)?,
        _ => j = skip(b, *i, depth)?,
    }
    *i = j;
    Ok(())
}

/// Validates one value at `depth` starting at `b[i..]` that nothing reads; returns the index
/// after it. Iterative, with the open containers kept as bits (set: object), because most of a
/// body is skipped and a call per value would cost more than the value.
fn skip(b: &[u8], mut i: usize, depth: u32) -> Result<usize, ()> {
    // At most MAX_JSON_DEPTH + 1 containers are open (a value is read only at depth ≤ MAX).
    let mut objects = [0u64; (MAX_JSON_DEPTH as usize + 1).div_ceil(64)];
    let mut open = 0usize;
    loop {
        // A value at depth + open.
        if depth as usize + open > MAX_JSON_DEPTH as usize {
            return Err(());
        }
        let c = token(b, &mut i).ok_or(())?;
        let opened = match c {
            b'{' => !token_if(b, &mut i, b'}'),
            b'[' => !token_if(b, &mut i, b']'),
            b'"' => {
                string(b, &mut i)?;
                false
            }
            b't' => literal(b, &mut i, b"rue").map(|()| false)?,
            b'f' => literal(b, &mut i, b"alse").map(|()| false)?,
            b'n' => literal(b, &mut i, b"ull").map(|()| false)?,
            b'-' | b'0'..=b'9' => number(b, &mut i, c).map(|()| false)?,
            _ => return Err(()),
        };
        if opened {
            let is_object = c == b'{';
            let (word, bit) = (open / 64, 1u64 << (open % 64));
            let w = objects.get_mut(word).ok_or(())?;
            if is_object {
                *w |= bit;
                key(b, &mut i)?;
            } else {
                *w &= !bit;
            }
            open += 1;
            continue;
        }
        // A value ended: close containers until one continues with a comma.
        loop {
            let Some(top) = open.checked_sub(1) else {
                return Ok(i);
            };
            let is_object = objects.get(top / 64).ok_or(())? & (1u64 << (top % 64)) != 0;
            match (token(b, &mut i), is_object) {
                (Some(b','), true) => {
                    key(b, &mut i)?;
                    break;
                }
                (Some(b','), false) => break,
                (Some(b'}'), true) | (Some(b']'), false) => open = top,
                _ => return Err(()),
            }
        }
    }
}

impl<'a> Scanner<'a> {
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
        let n = match trie.nodes.get(node as usize) {
            Some(n) if !n.children.is_empty() || n.slot.is_some() => n,
            _ => {
                self.i = skip(self.b, self.i, depth)?;
                return Ok(());
            }
        };
        if depth > MAX_JSON_DEPTH {
            return Err(());
        }
        let b = self.b;
        match token(b, &mut self.i).ok_or(())? {
            c @ (b'{' | b'[') => {
                self.record(n.slot, Slot::Complex);
                if n.children.is_empty() {
                    // Nothing below is read: let `skip` take the container from its bracket.
                    self.i -= 1;
                    self.i = skip(b, self.i, depth)?;
                    Ok(())
                } else if c == b'{' {
                    self.object(depth, n)
                } else {
                    self.array(depth, n)
                }
            }
            b'"' => {
                let (start, end, escaped) = string(b, &mut self.i)?;
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
            b't' => literal(b, &mut self.i, b"rue").map(|()| self.record(n.slot, Slot::Bool(true))),
            b'f' => {
                literal(b, &mut self.i, b"alse").map(|()| self.record(n.slot, Slot::Bool(false)))
            }
            b'n' => literal(b, &mut self.i, b"ull").map(|()| self.record(n.slot, Slot::Null)),
            c @ (b'-' | b'0'..=b'9') => {
                let start = self.i - 1;
                number(b, &mut self.i, c)?;
                if n.slot.is_some() {
                    let text = b.get(start..self.i).ok_or(())?;
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

    /// The members of an object whose `{` was just read, some of which paths below `parent` reach.
    fn object(&mut self, depth: u32, parent: &'a TrieNode) -> Result<(), ()> {
        let b = self.b;
        if token_if(b, &mut self.i, b'}') {
            return Ok(());
        }
        loop {
            if token(b, &mut self.i) != Some(b'"') {
                return Err(());
            }
            let (ks, ke, kesc) = string(b, &mut self.i)?;
            if token(b, &mut self.i) != Some(b':') {
                return Err(());
            }
            match self.child_by_key(parent, ks, ke, kesc) {
                Some(child) => self.value(child, depth + 1)?,
                None => skip_value(b, &mut self.i, depth + 1)?,
            }
            match token(b, &mut self.i) {
                Some(b',') => {}
                Some(b'}') => return Ok(()),
                _ => return Err(()),
            }
        }
    }

    /// The elements of an array whose `[` was just read, some of which paths below `parent` reach.
    fn array(&mut self, depth: u32, parent: &'a TrieNode) -> Result<(), ()> {
        let b = self.b;
        if token_if(b, &mut self.i, b']') {
            return Ok(());
        }
        let mut index = 0u32;
        loop {
            let child = parent.children.iter().find_map(|(s, c)| match s {
                Seg::Index(k) if *k == index => Some(*c),
                _ => None,
            });
            match child {
                Some(child) => self.value(child, depth + 1)?,
                None => skip_value(b, &mut self.i, depth + 1)?,
            }
            index = index.saturating_add(1);
            match token(b, &mut self.i) {
                Some(b',') => {}
                Some(b']') => return Ok(()),
                _ => return Err(()),
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
