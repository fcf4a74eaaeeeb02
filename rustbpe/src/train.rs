//! BPE training core (pure Rust, no Python).
//!
//! Two stages:
//! 1. `ChunkCounter`: split texts into regex chunks and count each distinct chunk, in parallel
//!    (one hash map per rayon thread, documents handed out one at a time for load balance).
//! 2. `train_bpe`: learn merges over the weighted distinct chunks.
//!
//! Merge semantics (a reference implementation must agree merge for merge): every chunk is a
//! sequence of byte ids weighted by its count; each round counts every consecutive pair (overlapping
//! ones included) weighted; the highest count wins, ties go to the smallest (left, right); the winner
//! becomes id 256 + round and is merged left to right, non-overlapping, in every chunk. Training
//! stops early only when no pair is left.
//!
//! Incremental algorithm: keep the count of every pair plus the list of chunks it occurs in, and a
//! max-heap of (count, reversed pair) with lazy invalidation. Merging (a, b) into X only creates
//! pairs that contain X, so an existing pair's count can only go down: a popped heap entry whose
//! count is stale is re-pushed with its true count, and the first entry whose count is current is
//! the true maximum (ties broken by the smallest pair through the heap order). Each round only
//! touches the chunks that contain the merged pair.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::split::Splitter;

// ---------------------------------------------------------------------------------------------
// Stage 1: chunk counting.

/// Chunks of up to 15 bytes (most of them) are counted under an integer key (bytes plus length),
/// which hashes and compares much faster than a string; longer ones under their text.
#[derive(Default)]
struct Counts {
    small: FxHashMap<(u64, u64), u64>,
    large: FxHashMap<Box<str>, u64>,
}

const SMALL: usize = 15;

/// Bytes (up to 15) and length packed in two words: 24-byte table entries, 8-byte aligned.
#[inline]
fn small_key(b: &[u8]) -> (u64, u64) {
    let mut buf = [0u8; 16];
    buf[..b.len()].copy_from_slice(b);
    buf[15] = b.len() as u8;
    let k = u128::from_le_bytes(buf);
    (k as u64, (k >> 64) as u64)
}

#[inline]
fn small_bytes(k: (u64, u64)) -> Vec<u8> {
    let buf = (k.0 as u128 | (k.1 as u128) << 64).to_le_bytes();
    buf[..buf[15] as usize].to_vec()
}

impl Counts {
    #[inline]
    fn add(&mut self, chunk: &str) {
        if chunk.len() <= SMALL {
            *self.small.entry(small_key(chunk.as_bytes())).or_insert(0) += 1;
        } else if let Some(c) = self.large.get_mut(chunk) {
            *c += 1;
        } else {
            self.large.insert(chunk.into(), 1);
        }
    }
}

pub struct ChunkCounter {
    /// One table per rayon thread; each thread only ever locks its own (uncontended).
    maps: Vec<Mutex<Counts>>,
}

impl Default for ChunkCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkCounter {
    pub fn new() -> Self {
        let n = rayon::current_num_threads().max(1);
        ChunkCounter { maps: (0..n).map(|_| Mutex::new(Counts::default())).collect() }
    }

    /// Split and count every text of `texts`, in parallel. Err: a regex runtime error.
    pub fn add_texts<S: AsRef<str> + Sync>(&self, splitter: &Splitter, texts: &[S]) -> Result<(), String> {
        let next = AtomicUsize::new(0);
        let error: Mutex<Option<String>> = Mutex::new(None);
        let work = |thread: usize| {
            let mut map = self.maps[thread % self.maps.len()].lock().unwrap();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= texts.len() {
                    break;
                }
                if let Err(e) = splitter.for_each(texts[i].as_ref(), |chunk| map.add(chunk)) {
                    error.lock().unwrap().get_or_insert(e);
                    next.store(texts.len(), Ordering::Relaxed);
                    break;
                }
            }
        };
        if texts.len() <= 1 || self.maps.len() == 1 {
            work(0);
        } else {
            rayon::broadcast(|ctx| work(ctx.index()));
        }
        match error.into_inner().unwrap() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// All distinct chunks (as bytes) with their counts, order unspecified.
    pub fn into_counts(self) -> Vec<(Vec<u8>, u64)> {
        let mut maps: Vec<Counts> = self.maps.into_iter().map(|m| m.into_inner().unwrap()).collect();
        // Merge the other tables into the largest one.
        maps.sort_by_key(|m| Reverse(m.small.len() + m.large.len()));
        let mut it = maps.into_iter();
        let mut total = it.next().unwrap_or_default();
        for m in it {
            for (k, v) in m.small {
                *total.small.entry(k).or_insert(0) += v;
            }
            for (k, v) in m.large {
                *total.large.entry(k).or_insert(0) += v;
            }
        }
        let mut out = Vec::with_capacity(total.small.len() + total.large.len());
        out.extend(total.small.into_iter().map(|(k, v)| (small_bytes(k), v)));
        out.extend(total.large.into_iter().map(|(k, v)| (k.into_boxed_bytes().into_vec(), v)));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Stage 2: merges.

#[inline]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

#[inline]
fn unpack(p: u64) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

#[derive(Default)]
struct PairInfo {
    /// Weighted number of occurrences.
    count: i64,
    /// Chunks that contained the pair when it was created (no duplicates; may be stale).
    words: Vec<u32>,
}

type PairTable = FxHashMap<u64, PairInfo>;

/// All distinct chunks, as one flat arena of token ids; chunk w lives in
/// `ids[start[w] .. start[w] + len[w]]` and shrinks in place as merges apply.
struct Words {
    ids: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    freq: Vec<i64>,
}

/// Pair counts and positions of chunks `lo..hi`.
fn count_pairs(words: &Words, lo: usize, hi: usize) -> PairTable {
    let mut table = PairTable::default();
    for w in lo..hi {
        let s = words.start[w];
        let ids = &words.ids[s..s + words.len[w] as usize];
        let f = words.freq[w];
        for win in ids.windows(2) {
            let e = table.entry(pack(win[0], win[1])).or_default();
            e.count += f;
            if e.words.last() != Some(&(w as u32)) {
                e.words.push(w as u32);
            }
        }
    }
    table
}

/// Learn up to `num_merges` merges from weighted chunks. Returns the merged pairs in order:
/// merge i creates token id 256 + i. Fewer merges come back only when no pair is left.
pub fn train_bpe<'a, I>(chunks: I, num_merges: usize) -> Vec<(u32, u32)>
where
    I: IntoIterator<Item = (&'a [u8], u64)>,
{
    let mut words = Words { ids: Vec::new(), start: Vec::new(), len: Vec::new(), freq: Vec::new() };
    for (bytes, count) in chunks {
        // Single bytes (and empties) hold no pair and never will: skip them.
        if bytes.len() < 2 || count == 0 {
            continue;
        }
        words.start.push(words.ids.len());
        words.len.push(bytes.len() as u32);
        words.freq.push(count as i64);
        words.ids.extend(bytes.iter().map(|&b| b as u32));
    }
    let n = words.len.len();

    // Initial pair table: parallel over slices of chunks, then merged.
    let threads = rayon::current_num_threads().max(1);
    let step = n.div_ceil(threads * 4).max(4096);
    let parts: Vec<PairTable> = (0..n)
        .step_by(step)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|lo| count_pairs(&words, lo, (lo + step).min(n)))
        .collect();
    let mut parts = parts.into_iter();
    let mut table = parts.next().unwrap_or_default();
    for part in parts {
        for (p, info) in part {
            let e = table.entry(p).or_default();
            e.count += info.count;
            e.words.extend(info.words);
        }
    }

    table.reserve(table.len() * 4);
    let mut heap: BinaryHeap<(i64, Reverse<u64>)> =
        table.iter().filter(|(_, e)| e.count > 0).map(|(&p, e)| (e.count, Reverse(p))).collect();

    let mut merges = Vec::with_capacity(num_merges);
    let mut new_pairs: Vec<u64> = Vec::new();
    while merges.len() < num_merges {
        // Pop the best pair whose heap count is current.
        let Some((count, Reverse(pair))) = heap.pop() else { break };
        let actual = table.get(&pair).map_or(0, |e| e.count);
        if actual != count {
            debug_assert!(actual < count, "pair counts only decrease");
            if actual > 0 {
                heap.push((actual, Reverse(pair)));
            }
            continue;
        }
        let (a, b) = unpack(pair);
        let new_id = 256 + merges.len() as u32;
        merges.push((a, b));

        let occ = std::mem::take(&mut table.get_mut(&pair).unwrap().words);
        new_pairs.clear();
        for &w in &occ {
            merge_word(&mut words, w, a, b, new_id, &mut table, &mut new_pairs);
        }
        // Every occurrence is merged, so (a, b) dropped to zero.
        debug_assert_eq!(table[&pair].count, 0);
        for &p in &new_pairs {
            if let Some(e) = table.get(&p) {
                if e.count > 0 {
                    heap.push((e.count, Reverse(p)));
                }
            }
        }
    }
    merges
}

#[inline]
fn dec(table: &mut PairTable, p: u64, f: i64) {
    // Entries stay in the table at zero (removing them would leave tombstones that force
    // rehashes); an existing pair never regains occurrences, so its chunk list can go.
    let e = table.get_mut(&p).expect("decremented pair is counted");
    e.count -= f;
    debug_assert!(e.count >= 0);
    if e.count == 0 {
        e.words = Vec::new();
    }
}

#[inline]
fn inc(table: &mut PairTable, p: u64, f: i64, w: u32, new_pairs: &mut Vec<u64>) {
    let e = match table.entry(p) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(v) => {
            new_pairs.push(p);
            v.insert(PairInfo::default())
        }
    };
    e.count += f;
    if e.words.last() != Some(&w) {
        e.words.push(w);
    }
}

/// Merge every (a, b) in chunk `w`, left to right, non-overlapping, updating pair counts.
/// For each occurrence `.. L a b R ..` -> `.. L X R ..`: (L,a), (a,b), (b,R) lose the chunk's
/// weight and (L,X), (X,R) gain it. When two occurrences touch (`a b a b`), the first already
/// removed (b,a) and added (X,a); the second turns that (X,a) into (X,X).
fn merge_word(
    words: &mut Words,
    w: u32,
    a: u32,
    b: u32,
    x: u32,
    table: &mut PairTable,
    new_pairs: &mut Vec<u64>,
) {
    let s = words.start[w as usize];
    let end = s + words.len[w as usize] as usize;
    let f = words.freq[w as usize];
    let ids = &mut words.ids;
    let mut out = s;
    let mut i = s;
    let mut prev_merged = false;
    while i < end {
        if i + 1 < end && ids[i] == a && ids[i + 1] == b {
            if out > s {
                if prev_merged {
                    dec(table, pack(x, a), f);
                    inc(table, pack(x, x), f, w, new_pairs);
                } else {
                    let l = ids[out - 1];
                    dec(table, pack(l, a), f);
                    inc(table, pack(l, x), f, w, new_pairs);
                }
            }
            dec(table, pack(a, b), f);
            if i + 2 < end {
                let r = ids[i + 2];
                dec(table, pack(b, r), f);
                inc(table, pack(x, r), f, w, new_pairs);
            }
            ids[out] = x;
            out += 1;
            i += 2;
            prev_merged = true;
        } else {
            ids[out] = ids[i];
            out += 1;
            i += 1;
            prev_merged = false;
        }
    }
    words.len[w as usize] = (out - s) as u32;
}

/// Bytes of every token id, given the merges (ids 0..256 are the bytes themselves).
pub fn token_bytes(merges: &[(u32, u32)]) -> Vec<Vec<u8>> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(l, r) in merges {
        let mut t = vocab[l as usize].clone();
        t.extend_from_slice(&vocab[r as usize]);
        vocab.push(t);
    }
    vocab
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::GPT4_PATTERN;

    /// Straightforward reference: recount everything every round.
    fn reference(chunks: &[(&[u8], u64)], num_merges: usize) -> Vec<(u32, u32)> {
        let mut words: Vec<(Vec<u32>, i64)> =
            chunks.iter().map(|(b, c)| (b.iter().map(|&x| x as u32).collect(), *c as i64)).collect();
        let mut merges = Vec::new();
        for round in 0..num_merges {
            let mut counts: std::collections::BTreeMap<(u32, u32), i64> = Default::default();
            for (w, f) in &words {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += f;
                }
            }
            // Max count; BTreeMap iterates pairs ascending, so keep the first max.
            let mut best: Option<((u32, u32), i64)> = None;
            for (&p, &c) in &counts {
                if c > 0 && best.is_none_or(|(_, bc)| c > bc) {
                    best = Some((p, c));
                }
            }
            let Some(((a, b), _)) = best else { break };
            let x = 256 + round as u32;
            for (w, _) in words.iter_mut() {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                        out.push(x);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
            merges.push((a, b));
        }
        merges
    }

    fn check(chunks: &[(&[u8], u64)], num_merges: usize) {
        assert_eq!(train_bpe(chunks.iter().copied(), num_merges), reference(chunks, num_merges));
    }

    #[test]
    fn repeats_and_overlaps() {
        check(&[(b"aaaaaa", 1)], 10);
        check(&[(b"aaa", 3), (b"aaaa", 1), (b"ab", 2)], 10);
        check(&[(b"abab", 1), (b"ababab", 2), (b"ba", 5)], 10);
        check(&[(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 7)], 20);
    }

    #[test]
    fn ties_go_to_smallest_pair() {
        // "ab" and "cd" both count 1: (a,b) first; then "cd".
        assert_eq!(train_bpe([(&b"cd"[..], 1), (&b"ab"[..], 1)], 5), vec![(97, 98), (99, 100)]);
    }

    #[test]
    fn stops_when_no_pair_left() {
        let m = train_bpe([(&b"abc"[..], 1)], 100);
        assert_eq!(m, vec![(97, 98), (256, 99)]);
        assert!(train_bpe([(&b"a"[..], 5)], 10).is_empty());
    }

    #[test]
    fn random_against_reference() {
        let mut state = 12345u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for trial in 0..60 {
            let alpha = 2 + trial % 4;
            let words: Vec<(Vec<u8>, u64)> = (0..1 + rnd() % 30)
                .map(|_| {
                    let len = 1 + (rnd() % 12) as usize;
                    ((0..len).map(|_| b'a' + (rnd() % alpha as u64) as u8).collect(), 1 + rnd() % 5)
                })
                .collect();
            let chunks: Vec<(&[u8], u64)> = words.iter().map(|(w, c)| (&w[..], *c)).collect();
            check(&chunks, 40);
        }
    }

    #[test]
    fn real_text_against_reference() {
        let text = "The quick brown fox jumps over the lazy dog. It's 2024; we've seen 1234567 \
                    foxes!!\n\n    def f(x):\n        return x ** 2  # ok\n日本語のテキスト 😀😀 naïve café";
        let counter = ChunkCounter::new();
        let sp = Splitter::new(GPT4_PATTERN).unwrap();
        counter.add_texts(&sp, &[text, text, "the the the fox"]).unwrap();
        let counts = counter.into_counts();
        let chunks: Vec<(&[u8], u64)> = counts.iter().map(|(k, c)| (&k[..], *c)).collect();
        check(&chunks, 200);
    }

    #[test]
    fn counter_counts() {
        let counter = ChunkCounter::new();
        let sp = Splitter::new(GPT4_PATTERN).unwrap();
        let long = "x".repeat(40);
        let texts: Vec<String> = (0..100).map(|i| format!("hello world {i} {long}")).collect();
        counter.add_texts(&sp, &texts).unwrap();
        let mut counts = counter.into_counts();
        counts.sort();
        let get = |k: &str| counts.iter().find(|(c, _)| c == k.as_bytes()).map(|x| x.1);
        assert_eq!(get("hello"), Some(100));
        assert_eq!(get(" world"), Some(100));
        assert_eq!(get(" "), Some(100));
        assert_eq!(get("7"), Some(1));
        assert_eq!(get(&format!(" {long}")), Some(100));
    }

    #[test]
    fn token_bytes_follow_merges() {
        let v = token_bytes(&[(97, 98), (256, 99)]);
        assert_eq!(v.len(), 258);
        assert_eq!(v[257], b"abc");
    }
}
