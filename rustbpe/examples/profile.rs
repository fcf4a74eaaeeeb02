//! Time the training phases on a text file without Python:
//! `cargo run --release --example profile -- FILE [VOCAB] [--regex]`
use std::time::Instant;

use rustbpe::split::{Splitter, GPT4_PATTERN};
use rustbpe::train::{train_bpe, ChunkCounter};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: profile FILE [VOCAB] [--regex]");
    let vocab: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(8192);
    let text = std::fs::read_to_string(path).expect("read corpus");
    // Documents of ~4000 bytes cut at char boundaries, like the benchmark feeds them.
    let mut docs = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let mut j = (i + 4000).min(text.len());
        while !text.is_char_boundary(j) {
            j += 1;
        }
        docs.push(text[i..j].to_string());
        i = j;
    }
    let sp = if args.iter().any(|a| a == "--regex") {
        Splitter::new_regex(GPT4_PATTERN).unwrap()
    } else {
        Splitter::new(GPT4_PATTERN).unwrap()
    };
    let mb = text.len() as f64 / 1e6;
    let t0 = Instant::now();
    let counter = ChunkCounter::new();
    counter.add_texts(&sp, &docs).unwrap();
    let t1 = Instant::now();
    let counts = counter.into_counts();
    let t2 = Instant::now();
    let merges = train_bpe(counts.iter().map(|(k, c)| (&k[..], *c)), vocab - 256);
    let t3 = Instant::now();
    println!(
        "{mb:.1} MB, {} unique chunks, {} merges | split+count {:.3}s, merge maps {:.3}s, bpe {:.3}s | total {:.3}s = {:.1} MB/s",
        counts.len(),
        merges.len(),
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t3 - t2).as_secs_f64(),
        (t3 - t0).as_secs_f64(),
        mb / (t3 - t0).as_secs_f64()
    );
}
