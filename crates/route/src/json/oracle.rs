//! The straightforward byte-at-a-time body scanner that `json::scan` replaced, kept only as the
//! reference the differential tests compare the fast scanner against (same validity verdict,
//! same slots, on generated and mutated bodies).

use super::{Seg, Slot, Trie, unescape};

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
pub(super) fn scan_reference(text: &[u8], trie: &Trie, slots: &mut [Slot]) -> Result<(), ()> {
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

#[cfg(test)]
mod differential {
    //! The fast scanner against the reference: same verdict and same slots on generated JSON,
    //! on mutated JSON (most of it invalid) and on arbitrary bytes.

    use proptest::prelude::*;

    use super::super::{Seg, Slot, Trie, fast_decimal, scan};
    use super::scan_reference;

    /// Keys the generated bodies and paths share, so that paths hit (including an escaped
    /// spelling of `ab` and a non-ASCII key).
    const KEYS: [&str; 5] = ["a", "b", "ab", "a\\u0062", "é"];

    fn json_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            "-?(0|[1-9][0-9]{0,18})(\\.[0-9]{1,18})?([eE][+-]?[0-9]{1,3})?",
            "\"([a-z0-9 ]|\\\\[nt\"\\\\/]|\\\\u00[0-9a-f]{2}|é){0,20}\"",
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec((0..KEYS.len(), inner, " ?", " ?"), 0..6).prop_map(|v| {
                    let members: Vec<String> = v
                        .into_iter()
                        .map(|(k, val, s1, s2)| format!("\"{}\"{s1}:{s2}{val}", KEYS[k]))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    fn trie() -> impl Strategy<Value = Trie> {
        let seg = prop_oneof![
            (0..3usize).prop_map(|k| Seg::Key(["a", "b", "ab"][k].into())),
            Just(Seg::Key("é".into())),
            (0..3u32).prop_map(Seg::Index),
        ];
        prop::collection::vec(prop::collection::vec(seg, 1..4), 0..6).prop_map(|paths| {
            let mut t = Trie::default();
            for p in &paths {
                t.insert(p);
            }
            t
        })
    }

    /// Byte edits: (position, kind, byte).
    fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
        let byte = prop_oneof![
            prop::sample::select(b"{}[]:,\"\\ \t\n0123456789-+.eEtrufalsn\x01\xff".to_vec()),
            any::<u8>(),
        ];
        prop::collection::vec((any::<usize>(), 0..3u8, byte), 0..3)
    }

    fn mutate(text: &str, edits: &[(usize, u8, u8)]) -> Vec<u8> {
        let mut b = text.as_bytes().to_vec();
        for &(pos, kind, byte) in edits {
            let at = pos % (b.len() + 1);
            match kind {
                0 => b.insert(at, byte),
                1 if at < b.len() => {
                    b.remove(at);
                }
                _ => b.truncate(at),
            }
        }
        b
    }

    fn same(text: &[u8], trie: &Trie) -> Result<(), TestCaseError> {
        let mut fast = vec![Slot::Missing; trie.slot_count()];
        let mut reference = fast.clone();
        let a = scan(text, trie, &mut fast);
        let b = scan_reference(text, trie, &mut reference);
        prop_assert_eq!(a, b, "verdict on {:?}", String::from_utf8_lossy(text));
        if a.is_ok() {
            // Slots are compared bit for bit (NaN never occurs, -0.0 must stay -0.0).
            let bits = |s: &[Slot]| -> Vec<String> {
                s.iter()
                    .map(|x| match x {
                        Slot::Num(n) => format!("num {:x}", n.to_bits()),
                        other => format!("{other:?}"),
                    })
                    .collect()
            };
            prop_assert_eq!(
                bits(&fast),
                bits(&reference),
                "slots on {:?}",
                String::from_utf8_lossy(text)
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn generated_json(v in json_value(), ws in "[ \t\r\n]{0,2}", t in trie()) {
            same(format!("{ws}{v}{ws}").as_bytes(), &t)?;
        }

        #[test]
        fn mutated_json(v in json_value(), e in edits(), t in trie()) {
            same(&mutate(&v, &e), &t)?;
        }

        #[test]
        fn arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..64), t in trie()) {
            same(&b, &t)?;
        }

        #[test]
        fn fast_decimal_matches_the_full_parser(
            t in "[+-]?[0-9]{0,17}(\\.[0-9]{0,17})?|[+-]?[0-9.eE+-]{0,12}"
        ) {
            if let Some(v) = fast_decimal(t.as_bytes()) {
                let full: f64 = t.parse().map_err(|e| TestCaseError::fail(format!("{t}: {e}")))?;
                prop_assert_eq!(v.to_bits(), full.to_bits(), "{}", t);
            }
        }

        #[test]
        fn fast_decimal_of_printed_doubles(x in any::<f64>().prop_filter("finite", |x| x.is_finite())) {
            for text in [format!("{x}"), format!("{x:.3}"), format!("{x:.15}")] {
                if let Some(v) = fast_decimal(text.as_bytes()) {
                    let full: f64 = text.parse().map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
                    prop_assert_eq!(v.to_bits(), full.to_bits(), "{}", text);
                }
            }
        }
    }

    #[test]
    fn fast_decimal_takes_the_common_shapes() {
        for (t, v) in [
            ("7.5", 7.5_f64),
            ("-0", -0.0),
            ("+0.25", 0.25),
            ("1480", 1480.0),
            ("31.5", 31.5),
            ("0.1", 0.1),
            (".5", 0.5),
            ("5.", 5.0),
            ("999999999999999", 999_999_999_999_999.0),
        ] {
            assert_eq!(
                fast_decimal(t.as_bytes()).map(f64::to_bits),
                Some(v.to_bits()),
                "{t}"
            );
        }
        for t in [
            "",
            "-",
            ".",
            "1.2.3",
            "1e5",
            "1234567890123456",
            "0x10",
            " 1",
            "--1",
            "inf",
        ] {
            assert_eq!(fast_decimal(t.as_bytes()), None, "{t}");
        }
    }

    #[test]
    fn deep_nesting_limit_is_the_same() {
        let t = Trie::default();
        for depth in [127, 128, 129, 130, 200] {
            for leaf in ["", "1"] {
                let text = format!("{}{leaf}{}", "[".repeat(depth), "]".repeat(depth));
                let mut t2 = Trie::default();
                t2.insert(&[Seg::Index(0), Seg::Index(0)]);
                for trie in [&t, &t2] {
                    if let Err(e) = same(text.as_bytes(), trie) {
                        panic!("depth {depth}: {e}");
                    }
                }
            }
        }
    }
}
