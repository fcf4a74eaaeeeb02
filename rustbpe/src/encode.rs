//! Encoding with a trained vocabulary, the way tiktoken does it, so that a `tiktoken.Encoding`
//! built from `get_mergeable_ranks()` and `get_pattern()` gives the very same ids: split with the
//! pattern; a chunk that is a whole token maps to it; otherwise start from its bytes and keep
//! merging the adjacent pair whose concatenated bytes have the lowest rank (leftmost on ties).
//! For a vocabulary trained by `train_bpe` this replays the training merges.

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::split::Splitter;

pub struct Encoder {
    ranks: FxHashMap<Vec<u8>, u32>,
    splitter: Splitter,
}

impl Encoder {
    /// `vocab[id]` are the bytes of token `id` (ids are ranks).
    pub fn new(vocab: &[Vec<u8>], splitter: Splitter) -> Encoder {
        let mut ranks = FxHashMap::default();
        for (id, bytes) in vocab.iter().enumerate() {
            // Keep the lowest id if two tokens ever share bytes (tiktoken would reject such a vocab).
            ranks.entry(bytes.clone()).or_insert(id as u32);
        }
        Encoder { ranks, splitter }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.splitter.for_each(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out))?;
        Ok(out)
    }

    pub fn batch_encode<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>, String> {
        texts.par_iter().map(|t| self.encode(t.as_ref())).collect()
    }

    #[inline]
    fn rank(&self, bytes: &[u8]) -> u32 {
        self.ranks.get(bytes).copied().unwrap_or(u32::MAX)
    }

    fn encode_chunk(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(&id) = self.ranks.get(piece) {
            out.push(id);
            return;
        }
        // bounds[k]: start of part k (the last entry is piece.len()); rank[k]: rank of parts k and
        // k+1 joined (u32::MAX when not a token or when k+1 is the last part).
        let mut bounds: Vec<usize> = (0..=piece.len()).collect();
        let pair_rank = |bounds: &[usize], k: usize| -> u32 {
            if k + 2 < bounds.len() {
                self.rank(&piece[bounds[k]..bounds[k + 2]])
            } else {
                u32::MAX
            }
        };
        let mut rank: Vec<u32> = (0..bounds.len()).map(|k| pair_rank(&bounds, k)).collect();
        loop {
            let mut best = (u32::MAX, 0);
            for (k, &r) in rank.iter().enumerate() {
                if r < best.0 {
                    best = (r, k);
                }
            }
            let (r, k) = best;
            if r == u32::MAX {
                break;
            }
            bounds.remove(k + 1);
            rank.remove(k + 1);
            rank[k] = pair_rank(&bounds, k);
            if k > 0 {
                rank[k - 1] = pair_rank(&bounds, k - 1);
            }
        }
        for w in bounds.windows(2) {
            out.push(self.rank(&piece[w[0]..w[1]]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::GPT4_PATTERN;
    use crate::train::{token_bytes, train_bpe, ChunkCounter};

    fn trained(texts: &[&str], merges: usize) -> (Encoder, Vec<Vec<u8>>) {
        let sp = Splitter::new(GPT4_PATTERN).unwrap();
        let c = ChunkCounter::new();
        c.add_texts(&sp, texts).unwrap();
        let counts = c.into_counts();
        let m = train_bpe(counts.iter().map(|(k, v)| (&k[..], *v)), merges);
        let vocab = token_bytes(&m);
        (Encoder::new(&vocab, Splitter::new(GPT4_PATTERN).unwrap()), vocab)
    }

    #[test]
    fn roundtrip_and_compression() {
        let text = "hello hello hello world, the world says hello 12345!";
        let (enc, vocab) = trained(&[text], 30);
        let ids = enc.encode(text).unwrap();
        let back: Vec<u8> = ids.iter().flat_map(|&i| vocab[i as usize].clone()).collect();
        assert_eq!(back, text.as_bytes());
        assert!(ids.len() < text.len() / 2);
        // Unseen text still round-trips (falls back to bytes).
        let other = "zebra ☃ quux";
        let ids = enc.encode(other).unwrap();
        let back: Vec<u8> = ids.iter().flat_map(|&i| vocab[i as usize].clone()).collect();
        assert_eq!(back, other.as_bytes());
    }

    #[test]
    fn untrained_is_bytes() {
        let vocab = token_bytes(&[]);
        let enc = Encoder::new(&vocab, Splitter::new(GPT4_PATTERN).unwrap());
        assert_eq!(enc.encode("hi!").unwrap(), vec![104, 105, 33]);
        assert_eq!(enc.batch_encode(&["a", ""]).unwrap(), vec![vec![97], vec![]]);
    }
}
