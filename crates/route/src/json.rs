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
    s.value(Some(0), 0)?;
    s.ws();
    if s.i == s.b.len() { Ok(()) } else { Err(()) }
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), ()> {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(())
        }
    }

    fn record(&mut self, node: Option<u32>, v: Slot) {
        if let Some(n) = node
            && let Some(s) = self.trie.nodes[n as usize].slot
            && let Some(slot) = self.slots.get_mut(s as usize)
        {
            *slot = v;
        }
    }

    /// Children to descend into (None when nobody needs anything below `node`).
    fn interesting(&self, node: Option<u32>) -> Option<u32> {
        node.filter(|&n| !self.trie.nodes[n as usize].children.is_empty())
    }

    fn value(&mut self, node: Option<u32>, depth: u32) -> Result<(), ()> {
        if depth > MAX_JSON_DEPTH {
            return Err(());
        }
        self.ws();
        match self.b.get(self.i).copied().ok_or(())? {
            b'{' => {
                self.i += 1;
                self.record(node, Slot::Complex);
                let parent = self.interesting(node);
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.eat(b'"')?;
                    let (ks, ke, kesc) = self.string()?;
                    self.eat(b':')?;
                    let child = parent.and_then(|p| self.child_by_key(p, ks, ke, kesc));
                    self.value(child, depth + 1)?;
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(()),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.record(node, Slot::Complex);
                let parent = self.interesting(node);
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(());
                }
                let mut index = 0u32;
                loop {
                    let child = parent.and_then(|p| {
                        self.trie.nodes[p as usize]
                            .children
                            .iter()
                            .find(|(s, _)| *s == Seg::Index(index))
                            .map(|&(_, c)| c)
                    });
                    self.value(child, depth + 1)?;
                    index = index.saturating_add(1);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(()),
                    }
                }
            }
            b'"' => {
                self.i += 1;
                let (start, end, escaped) = self.string()?;
                self.record(
                    node,
                    Slot::Str {
                        start: start as u32,
                        end: end as u32,
                        escaped,
                    },
                );
                Ok(())
            }
            b't' => self.literal(b"true", node, Slot::Bool(true)),
            b'f' => self.literal(b"false", node, Slot::Bool(false)),
            b'n' => self.literal(b"null", node, Slot::Null),
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                self.number()?;
                if node.is_some_and(|n| self.trie.nodes[n as usize].slot.is_some()) {
                    let text = std::str::from_utf8(&self.b[start..self.i]).map_err(|_| ())?;
                    let v: f64 = text.parse().map_err(|_| ())?;
                    self.record(node, Slot::Num(v));
                }
                Ok(())
            }
            _ => Err(()),
        }
    }

    fn literal(&mut self, word: &[u8], node: Option<u32>, v: Slot) -> Result<(), ()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            self.record(node, v);
            Ok(())
        } else {
            Err(())
        }
    }

    fn digits(&mut self) -> usize {
        let n = self.b[self.i..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        self.i += n;
        n
    }

    fn number(&mut self) -> Result<(), ()> {
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.b.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(()),
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(());
            }
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
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
            let rel = self.b[self.i..]
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .ok_or(())?;
            self.i += rel;
            match self.b[self.i] {
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
                _ => return Err(()),
            }
        }
    }

    fn child_by_key(&self, parent: u32, start: usize, end: usize, escaped: bool) -> Option<u32> {
        let raw = &self.b[start..end];
        let children = &self.trie.nodes[parent as usize].children;
        if !escaped {
            return children.iter().find_map(|(s, c)| match s {
                Seg::Key(k) if k.as_bytes() == raw => Some(*c),
                _ => None,
            });
        }
        let key = unescape(&String::from_utf8_lossy(raw));
        children.iter().find_map(|(s, c)| match s {
            Seg::Key(k) if **k == *key => Some(*c),
            _ => None,
        })
    }
}

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
