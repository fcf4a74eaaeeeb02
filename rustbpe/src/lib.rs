//! rustbpe: fast byte-level BPE training with Python bindings (nanochat-aquarat).
//!
//! The algorithm lives in pure-Rust modules (`split`, `train`, `encode`) that `cargo test`
//! exercises without Python; this file is only the PyO3 layer.

pub mod encode;
pub mod split;
pub mod train;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use encode::Encoder;
use split::{Splitter, GPT4_PATTERN};
use train::{token_bytes, train_bpe, ChunkCounter};

/// Byte-level BPE tokenizer: train on an iterator of strings, then encode or export the ranks.
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    merges: Vec<(u32, u32)>,
    vocab: Vec<Vec<u8>>,
    encoder: Encoder,
}

fn value_error(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

#[pymethods]
impl Tokenizer {
    /// An untrained tokenizer: the 256 byte tokens and the GPT-4 split pattern.
    #[new]
    fn new() -> Self {
        let vocab = token_bytes(&[]);
        let encoder = Encoder::new(&vocab, Splitter::new(GPT4_PATTERN).expect("GPT-4 pattern"));
        Tokenizer { pattern: GPT4_PATTERN.to_string(), merges: Vec::new(), vocab, encoder }
    }

    /// Train on the strings of `iterator` (any Python iterable of str) and learn
    /// `vocab_size - 256` merges. Strings are pulled `buffer_size` at a time with the GIL held,
    /// then split and counted in parallel with the GIL released. `pattern` defaults to the GPT-4
    /// split pattern. Fewer merges are learned only if the text runs out of pairs.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(value_error(format!(
                "vocab_size must be >= 256 (the 256 byte tokens), got {vocab_size}"
            )));
        }
        if vocab_size > (u32::MAX / 2) as i64 {
            return Err(value_error(format!("vocab_size {vocab_size} is too large")));
        }
        if buffer_size < 1 {
            return Err(value_error(format!("buffer_size must be >= 1, got {buffer_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(value_error)?;
        let mut it = iterator.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator: expected an iterable of str, got {}",
                type_name(iterator)
            ))
        })?;

        let counter = ChunkCounter::new();
        let buffer_size = buffer_size as usize;
        // Pipeline: while a background thread splits and counts buffer k (no GIL needed), this
        // thread pulls buffer k+1 from Python with the GIL held. The scope joins the worker on
        // every exit path, errors included.
        std::thread::scope(|scope| -> PyResult<()> {
            let mut pending: Option<std::thread::ScopedJoinHandle<'_, Result<(), String>>> = None;
            let mut index = 0usize;
            loop {
                let mut buffer: Vec<String> = Vec::with_capacity(buffer_size.min(1 << 16));
                let mut exhausted = false;
                while buffer.len() < buffer_size {
                    let Some(item) = it.next() else {
                        exhausted = true;
                        break;
                    };
                    let item = item?;
                    let s = item.cast::<PyString>().map_err(|_| {
                        PyTypeError::new_err(format!(
                            "train_from_iterator: item {index} is {}, expected str",
                            type_name(&item)
                        ))
                    })?;
                    buffer.push(s.to_str()?.to_owned());
                    index += 1;
                }
                py.check_signals()?;
                if let Some(job) = pending.take() {
                    py.detach(|| job.join()).expect("counting thread panicked").map_err(value_error)?;
                }
                let (counter, splitter) = (&counter, &splitter);
                pending = Some(scope.spawn(move || counter.add_texts(splitter, &buffer)));
                if exhausted {
                    break;
                }
            }
            if let Some(job) = pending.take() {
                py.detach(|| job.join()).expect("counting thread panicked").map_err(value_error)?;
            }
            Ok(())
        })?;

        let num_merges = (vocab_size - 256) as usize;
        let merges = py.detach(|| {
            let counts = counter.into_counts();
            train_bpe(counts.iter().map(|(k, c)| (&k[..], *c)), num_merges)
        });
        self.vocab = token_bytes(&merges);
        self.merges = merges;
        self.encoder = Encoder::new(&self.vocab, splitter);
        self.pattern = pattern;
        Ok(())
    }

    /// The split pattern used for training and encoding.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// `[(token_bytes, rank), ...]` for ranks 0..vocab size (bytes first, then merges in order):
    /// feed `dict(...)` to `tiktoken.Encoding(mergeable_ranks=...)`.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.vocab.iter().enumerate().map(|(i, b)| (PyBytes::new(py, b), i as u32)).collect()
    }

    /// The learned merges in order: merge i joined `(left_id, right_id)` into id 256 + i.
    fn get_merges(&self) -> Vec<(u32, u32)> {
        self.merges.clone()
    }

    /// Number of tokens: 256 + number of merges.
    fn get_vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Token ids of `text` (no special tokens); identical to tiktoken with the same ranks/pattern.
    fn encode(&self, py: Python<'_>, text: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        let s = text.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!("encode: expected str, got {}", type_name(text)))
        })?;
        let s = s.to_str()?;
        py.detach(|| self.encoder.encode(s)).map_err(value_error)
    }

    /// Encode many texts in parallel (GIL released).
    fn batch_encode(&self, py: Python<'_>, texts: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u32>>> {
        let mut owned = Vec::new();
        for (i, t) in texts.try_iter()?.enumerate() {
            let t = t?;
            let s = t.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!("batch_encode: item {i} is {}, expected str", type_name(&t)))
            })?;
            owned.push(s.to_str()?.to_owned());
        }
        py.detach(|| self.encoder.batch_encode(&owned)).map_err(value_error)
    }

    fn __repr__(&self) -> String {
        format!("rustbpe.Tokenizer(vocab_size={}, pattern={:?})", self.vocab.len(), self.pattern)
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".to_string())
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    m.add("NANOCHAT_PATTERN", split::NANOCHAT_PATTERN)?;
    Ok(())
}
