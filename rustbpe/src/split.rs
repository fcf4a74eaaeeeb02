//! Pre-tokenization: cut text into regex chunks.
//!
//! Two engines give the same chunks:
//! - `Splitter::Regex`: any pattern, run by `fancy-regex` (needed for the look-ahead and the
//!   possessive quantifiers of the GPT-4 pattern). Slow: a backtracking VM, ~10 MB/s.
//! - `Splitter::Gpt4`: a hand-written matcher for exactly the GPT-4 split pattern (and the
//!   nanochat variant with `\p{N}{1,2}`), ~10x faster. It walks the alternatives in the same
//!   leftmost-first order as the regex and takes its Unicode classes (`\p{L}`, `\p{N}`, `\s`)
//!   from `regex-syntax`, the very tables `fancy-regex` compiles, so the two agree chunk for
//!   chunk; the unit tests below compare them on adversarial random text.

use std::sync::OnceLock;

use fancy_regex::Regex;

/// The GPT-4 (cl100k) split pattern; the default. Numbers are split in runs of 1..=3 digits.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// nanochat's variant (digits in runs of 1..=2, a smaller-vocab friendly choice). Also fast-pathed.
pub const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub enum Splitter {
    /// Hand-written GPT-4 matcher; the field is the maximum digit run (3 for GPT-4, 2 for nanochat).
    Gpt4 { max_digits: usize },
    Regex(Box<Regex>),
}

impl Splitter {
    /// Compile `pattern`; a bad pattern is an `Err` with the regex engine's message.
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        if pattern == GPT4_PATTERN {
            return Ok(Splitter::Gpt4 { max_digits: 3 });
        }
        if pattern == NANOCHAT_PATTERN {
            return Ok(Splitter::Gpt4 { max_digits: 2 });
        }
        Splitter::new_regex(pattern)
    }

    /// Always the generic regex engine (used by tests and to benchmark the fast path).
    pub fn new_regex(pattern: &str) -> Result<Splitter, String> {
        Regex::new(pattern)
            .map(|re| Splitter::Regex(Box::new(re)))
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Call `f` on every non-empty chunk of `text`, in order.
    pub fn for_each<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits } => {
                let mut pos = 0;
                while pos < text.len() {
                    let end = gpt4_match(text, pos, *max_digits);
                    f(&text[pos..end]);
                    pos = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("regex error while splitting: {e}"))?;
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
                Ok(())
            }
        }
    }

    /// Convenience for tests and encode paths: all chunks as a Vec.
    pub fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, String> {
        let mut out = Vec::new();
        self.for_each(text, |c| out.push(c))?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Character classes, from regex-syntax's Unicode tables.

const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const SPACE: u8 = 4; // \s (Unicode White_Space)

struct Classes {
    /// Class bits for every BMP code point (64 KiB, built once).
    bmp: Vec<u8>,
    /// Sorted, disjoint (start, end inclusive, bits) ranges above the BMP.
    astral: Vec<(u32, u32, u8)>,
}

fn unicode_ranges(class: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};
    let hir = regex_syntax::parse(class).expect("built-in class parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => {
            c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
        }
        _ => panic!("{class} is not a Unicode class"),
    }
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut bmp = vec![0u8; 0x10000];
        let mut astral = Vec::new();
        for (class, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in unicode_ranges(class) {
                for cp in lo..=hi.min(0xFFFF) {
                    bmp[cp as usize] |= bit;
                }
                if hi > 0xFFFF {
                    astral.push((lo.max(0x10000), hi, bit));
                }
            }
        }
        astral.sort_unstable();
        Classes { bmp, astral }
    })
}

#[inline]
fn class_of(c: char) -> u8 {
    let cp = c as u32;
    let t = classes();
    if cp < 0x10000 {
        return t.bmp[cp as usize];
    }
    // Ranges of different classes never overlap (L, N and White_Space are disjoint), so the
    // range with the greatest start <= cp decides.
    let i = t.astral.partition_point(|r| r.0 <= cp);
    if i > 0 && t.astral[i - 1].1 >= cp {
        t.astral[i - 1].2
    } else {
        0
    }
}

/// The character starting at byte `i` (must be a char boundary) and its byte length.
#[inline]
fn char_at(s: &str, i: usize) -> Option<(char, usize)> {
    let b = *s.as_bytes().get(i)?;
    if b < 0x80 {
        return Some((b as char, 1));
    }
    let c = s[i..].chars().next()?;
    Some((c, c.len_utf8()))
}

/// End of the run of characters whose class satisfies `pred`, starting at byte `i`.
#[inline]
fn run_end(s: &str, mut i: usize, pred: impl Fn(char, u8) -> bool) -> usize {
    while let Some((c, n)) = char_at(s, i) {
        if !pred(c, class_of(c)) {
            break;
        }
        i += n;
    }
    i
}

/// Case-insensitive match of one letter in `'(?i:[sdmt]|ll|ve|re)`, with the simple case
/// folding regex-syntax applies (`s` also matches U+017F LATIN SMALL LETTER LONG S).
#[inline]
fn ci_is(c: char, lower: char) -> bool {
    c == lower || c == lower.to_ascii_uppercase() || (lower == 's' && c == '\u{17F}')
}

/// End (byte offset) of the GPT-4-pattern match that starts at byte `i` (< s.len()).
/// Every position starts a match, so matches tile the text. The alternatives, in order:
///   1 `'(?i:[sdmt]|ll|ve|re)`  2 `[^\r\n\p{L}\p{N}]?+\p{L}+`  3 `\p{N}{1,3}`
///   4 ` ?[^\s\p{L}\p{N}]++[\r\n]*`  5 `\s*[\r\n]`  6 `\s+(?!\S)`  7 `\s+`
fn gpt4_match(s: &str, i: usize, max_digits: usize) -> usize {
    let (c, cn) = char_at(s, i).expect("i < len");
    let cc = class_of(c);
    let next = char_at(s, i + cn);
    // 1: contractions.
    if c == '\'' {
        if let Some((n1, l1)) = next {
            if ci_is(n1, 's') || ci_is(n1, 'd') || ci_is(n1, 'm') || ci_is(n1, 't') {
                return i + 1 + l1;
            }
            if let Some((n2, l2)) = char_at(s, i + 1 + l1) {
                let two = |a: char, b: char| ci_is(n1, a) && ci_is(n2, b);
                if two('l', 'l') || two('v', 'e') || two('r', 'e') {
                    return i + 1 + l1 + l2;
                }
            }
        }
    }
    // 2: letters, optionally led by one char that is not \r, \n, a letter or a number.
    if cc & LETTER != 0 {
        return run_end(s, i + cn, |_, k| k & LETTER != 0);
    }
    if c != '\r' && c != '\n' && cc & NUMBER == 0 {
        if let Some((_, k)) = next.map(|(n, l)| (l, class_of(n))) {
            if k & LETTER != 0 {
                return run_end(s, i + cn, |_, k| k & LETTER != 0);
            }
        }
    }
    // 3: up to `max_digits` numbers.
    if cc & NUMBER != 0 {
        let mut j = i + cn;
        for _ in 1..max_digits {
            match char_at(s, j) {
                Some((d, l)) if class_of(d) & NUMBER != 0 => j += l,
                _ => break,
            }
        }
        return j;
    }
    // 4: punctuation/symbols ("other": not space, letter or number), optionally after one
    // space, then any \r\n.
    let other = |_: char, k: u8| k & (LETTER | NUMBER | SPACE) == 0;
    let crlf = |ch: char, _: u8| ch == '\r' || ch == '\n';
    let start_other = if cc & SPACE == 0 {
        Some(i) // c is "other" (not a letter or number either: handled above)
    } else if c == ' ' {
        match next {
            Some((n, _)) if other(n, class_of(n)) => Some(i + 1),
            _ => None,
        }
    } else {
        None
    };
    if let Some(j) = start_other {
        let j = run_end(s, j, other);
        return run_end(s, j, crlf);
    }
    // c is whitespace. 5: the whitespace run up to its last \r or \n.
    let mut j = i;
    let mut last_nl = None;
    let mut last_start = i;
    let mut count = 0usize;
    while let Some((ch, l)) = char_at(s, j) {
        if class_of(ch) & SPACE == 0 {
            break;
        }
        last_start = j;
        j += l;
        count += 1;
        if ch == '\r' || ch == '\n' {
            last_nl = Some(j);
        }
    }
    if let Some(k) = last_nl {
        return k;
    }
    // 6: the run minus its last char when a non-space follows (so that char can lead the next
    // word); 7: a single space char before a non-space.
    if j == s.len() || count == 1 {
        j
    } else {
        last_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fast and regex splitters for both fast-pathed patterns (compiled once: debug builds of
    /// fancy-regex compile slowly).
    fn splitters() -> &'static Vec<(Splitter, Splitter)> {
        static S: OnceLock<Vec<(Splitter, Splitter)>> = OnceLock::new();
        S.get_or_init(|| {
            [GPT4_PATTERN, NANOCHAT_PATTERN]
                .iter()
                .map(|p| (Splitter::new(p).unwrap(), Splitter::new_regex(p).unwrap()))
                .collect()
        })
    }

    fn both(text: &str) {
        for (fast, slow) in splitters() {
            assert!(matches!(fast, Splitter::Gpt4 { .. }));
            assert_eq!(fast.split(text).unwrap(), slow.split(text).unwrap(), "text {text:?}");
        }
    }

    #[test]
    fn classes_match_regex() {
        // Each class bit agrees with a regex test on a spread of code points.
        let l = fancy_regex::Regex::new(r"^\p{L}$").unwrap();
        let n = fancy_regex::Regex::new(r"^\p{N}$").unwrap();
        let w = fancy_regex::Regex::new(r"^\s$").unwrap();
        for cp in (0u32..0x3000).chain((0x3000..0x110000).step_by(97)) {
            let Some(c) = char::from_u32(cp) else { continue };
            let s = c.to_string();
            let k = class_of(c);
            assert_eq!(k & LETTER != 0, l.is_match(&s).unwrap(), "{cp:x}");
            assert_eq!(k & NUMBER != 0, n.is_match(&s).unwrap(), "{cp:x}");
            assert_eq!(k & SPACE != 0, w.is_match(&s).unwrap(), "{cp:x}");
        }
    }

    #[test]
    fn case_folding_matches_regex() {
        let re = fancy_regex::Regex::new(r"^(?i:[sdmtlvre])$").unwrap();
        for cp in 0u32..0x30000 {
            let Some(c) = char::from_u32(cp) else { continue };
            let ours = "sdmtlvre".chars().any(|x| ci_is(c, x));
            assert_eq!(ours, re.is_match(&c.to_string()).unwrap(), "{cp:x}");
        }
    }

    #[test]
    fn fixed_examples() {
        let cases = [
            "Hello, world! It's 2024 and we've got 12345 tokens.",
            "I'LL DO IT, they'Re here, we'VE 'd 'x 'll",
            "  leading and trailing   ",
            "line one\nline two\r\n\r\n  indented\n\n\n",
            "tabs\t\tand\u{a0}nbsp\u{3000}ideographic space",
            "emoji 🚀🔥 and CJK 你好世界 and ١٢٣٤ arabic digits ½ ⅔",
            "aaaaaa bbbbbbbb    cccc",
            "x = f(y) + g[z] ** 2  # comment\n    return {'a': 1}\n",
            "'", " ", "\n", "'s", "a", "1", "!", " !", "  !", " \n", "\r\n ", "' '",
            "combining e\u{301}\u{301} marks",
            "\u{17F}'\u{17F} '\u{17F}",
            "",
        ];
        for t in cases {
            both(t);
        }
    }

    #[test]
    fn random_fuzz() {
        // Tiny xorshift so the test is deterministic without extra crates.
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet: Vec<char> = " \t\n\r\u{b}\u{c}\u{85}\u{a0}\u{2028}\u{3000}aZsStTdDmMlLvVeErRx'\"!?.,-_#()1234567890٣½Ⅻ€😀🚀中文é\u{301}ſ\u{10400}\u{1D7CE}"
            .chars()
            .collect();
        for _ in 0..20000 {
            let len = (rnd() % 24) as usize;
            let text: String =
                (0..len).map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize]).collect();
            both(&text);
        }
    }

    #[test]
    fn bad_pattern_is_error() {
        assert!(Splitter::new("(unclosed").is_err());
    }

    #[test]
    fn chunks_tile_text() {
        let t = "Some text, with 123456 numbers!\n\n  and more ";
        let s = Splitter::new(GPT4_PATTERN).unwrap();
        assert_eq!(s.split(t).unwrap().concat(), t);
    }
}
