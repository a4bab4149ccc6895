//! Samples to micro batches: padded (one row per sequence), packed (several rows per
//! sequence, `train.packing`) or padding-free (a micro batch's rows in one sequence,
//! `train.padding_free`).
//!
//! Every batch is `[batch_size, seq_len]`, row-major, in four flat vectors of length
//! `batch_size * seq_len`:
//! - `input_ids`: token ids, padding = the tokenizer's pad id;
//! - `labels`: unshifted (see [`Sample`]), `-100` on padding;
//! - `position_ids`: 0, 1, ... restarting at 0 for each row (each packed row too; padding
//!   continues counting, its value is never used);
//! - `segment_ids`: 1, 2, ... numbering the rows inside a sequence, 0 on padding. A query may
//!   attend to a key iff both have the same non-zero segment id (and causally): in a padded
//!   batch this is the attention mask, in a packed one it keeps rows apart. A packed row's
//!   first token is `<|im_start|>` with label -100, so the shifted loss never predicts across
//!   rows.
//!
//! A padding-free batch is the packed layout without the padding: `batch_size` is 1 and
//! `seq_len` is the sum of the micro batch's row lengths, so every segment id is non-zero.

use super::tokenize::{Sample, IGNORE};

/// One micro batch; see the module docs for the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<u32>,
    pub segment_ids: Vec<u32>,
}

impl Batch {
    /// The batch with each row extended on the right by padding (segment 0, ignored labels,
    /// `pad_id`) to the next multiple of `m` positions: what sequence parallelism needs to split
    /// a sequence into `m` equal shards. Padding is masked out of attention and the loss, so the
    /// losses and gradients are the unpadded batch's.
    pub fn padded_to_multiple(&self, m: usize, pad_id: u32) -> Batch {
        let seq_len = self.seq_len.next_multiple_of(m.max(1));
        let pad = seq_len - self.seq_len;
        if pad == 0 {
            return self.clone();
        }
        let n = self.batch_size * seq_len;
        let mut b = Batch {
            batch_size: self.batch_size,
            seq_len,
            input_ids: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            position_ids: Vec::with_capacity(n),
            segment_ids: Vec::with_capacity(n),
        };
        for r in 0..self.batch_size {
            let row = r * self.seq_len..(r + 1) * self.seq_len;
            let next = self.position_ids[row.clone()].last().map_or(0, |&p| p + 1);
            b.input_ids.extend(self.input_ids[row.clone()].iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
            b.labels.extend(self.labels[row.clone()].iter().copied().chain(std::iter::repeat_n(IGNORE, pad)));
            b.position_ids.extend(self.position_ids[row.clone()].iter().copied().chain(next..next + pad as u32));
            b.segment_ids.extend(self.segment_ids[row].iter().copied().chain(std::iter::repeat_n(0, pad)));
        }
        b
    }
}

/// Padded micro batches of `micro` rows each (the last may have fewer), each padded on the
/// right to its longest row.
pub fn padded(samples: &[Sample], micro: usize, pad_id: u32) -> Vec<Batch> {
    samples
        .chunks(micro.max(1))
        .map(|rows| {
            let seqs: Vec<Vec<&Sample>> = rows.iter().map(|s| vec![s]).collect();
            let seq_len = rows.iter().map(Sample::len).max().unwrap_or(0);
            assemble(&seqs, seq_len, pad_id)
        })
        .collect()
}

/// Packed micro batches of `micro` sequences of exactly `max_length` tokens each. Rows are
/// packed greedily in order (next-fit: a row that does not fit closes the sequence), which
/// keeps the shuffled order; rows longer than `max_length` cannot occur (truncation ran first)
/// and get a sequence of their own if they do.
pub fn packed(samples: &[Sample], micro: usize, max_length: usize, pad_id: u32) -> Vec<Batch> {
    let mut seqs: Vec<Vec<&Sample>> = Vec::new();
    let mut used = 0;
    for sample in samples {
        match seqs.last_mut() {
            Some(seq) if used + sample.len() <= max_length => seq.push(sample),
            _ => {
                seqs.push(vec![sample]);
                used = 0;
            }
        }
        used += sample.len();
    }
    seqs.chunks(micro.max(1))
        .map(|chunk| {
            let seq_len = chunk.iter().map(|s| s.iter().map(|r| r.len()).sum()).max().unwrap_or(0).max(max_length);
            assemble(chunk, seq_len, pad_id)
        })
        .collect()
}

/// Padding-free micro batches: each `micro` rows (the last may have fewer) concatenated into
/// one sequence of exactly their total length (`batch_size` 1, no padding). Positions restart
/// at 0 for each row and the segment ids number the rows 1, 2, ..., as in a packed sequence.
pub fn padding_free(samples: &[Sample], micro: usize) -> Vec<Batch> {
    samples
        .chunks(micro.max(1))
        .map(|rows| {
            let seq: Vec<&Sample> = rows.iter().collect();
            let seq_len = rows.iter().map(Sample::len).sum();
            // No padding is laid out, so the pad id is never written.
            assemble(&[seq], seq_len, 0)
        })
        .collect()
}

/// Lay out sequences (each a list of rows) as one `[seqs, seq_len]` batch.
fn assemble(seqs: &[Vec<&Sample>], seq_len: usize, pad_id: u32) -> Batch {
    let n = seqs.len() * seq_len;
    let mut b = Batch {
        batch_size: seqs.len(),
        seq_len,
        input_ids: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        segment_ids: Vec::with_capacity(n),
    };
    for rows in seqs {
        let mut filled = 0;
        for (segment, row) in rows.iter().enumerate() {
            b.input_ids.extend(&row.input_ids);
            b.labels.extend(&row.labels);
            b.position_ids.extend(0..row.len() as u32);
            b.segment_ids.extend(std::iter::repeat_n(segment as u32 + 1, row.len()));
            filled += row.len();
        }
        let pad = seq_len - filled;
        let last_pos = rows.last().map_or(0, |r| r.len());
        b.input_ids.extend(std::iter::repeat_n(pad_id, pad));
        b.labels.extend(std::iter::repeat_n(IGNORE, pad));
        b.position_ids.extend((last_pos..last_pos + pad).map(|p| p as u32));
        b.segment_ids.extend(std::iter::repeat_n(0, pad));
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, first: u32) -> Sample {
        let ids: Vec<u32> = (first..first + len as u32).collect();
        let labels = ids.iter().enumerate().map(|(i, &t)| if i == 0 { IGNORE } else { i64::from(t) }).collect();
        Sample { input_ids: ids, labels }
    }

    #[test]
    fn padded_batches_pad_to_the_longest_row() {
        let rows = [sample(3, 10), sample(5, 20), sample(2, 30)];
        let batches = padded(&rows, 2, 0);
        assert_eq!(batches.len(), 2);
        let b = &batches[0];
        assert_eq!((b.batch_size, b.seq_len), (2, 5));
        assert_eq!(b.input_ids, [10, 11, 12, 0, 0, 20, 21, 22, 23, 24]);
        assert_eq!(b.labels[..5], [IGNORE, 11, 12, IGNORE, IGNORE]);
        assert_eq!(b.position_ids[..5], [0, 1, 2, 3, 4]);
        assert_eq!(b.segment_ids, [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
        assert_eq!((batches[1].batch_size, batches[1].seq_len), (1, 2));
    }

    #[test]
    fn padding_to_a_multiple_extends_every_row_with_masked_positions() {
        let b = padding_free(&[sample(3, 10), sample(2, 20)], 2);
        assert_eq!(b[0].padded_to_multiple(5, b[0].seq_len as u32), b[0], "already a multiple");
        let p = b[0].padded_to_multiple(4, 7);
        assert_eq!((p.batch_size, p.seq_len), (1, 8));
        assert_eq!(p.input_ids[5..], [7, 7, 7]);
        assert_eq!(p.labels[5..], [IGNORE; 3]);
        assert_eq!(p.segment_ids, [1, 1, 1, 2, 2, 0, 0, 0]);
        assert_eq!(p.position_ids, [0, 1, 2, 0, 1, 2, 3, 4]);
        let two = padded(&[sample(3, 10), sample(1, 20)], 2, 0);
        let p = two[0].padded_to_multiple(2, 0);
        assert_eq!((p.batch_size, p.seq_len), (2, 4));
        assert_eq!(p.segment_ids, [1, 1, 1, 0, 1, 0, 0, 0]);
        assert_eq!(p.input_ids[..3], two[0].input_ids[..3]);
    }

    #[test]
    fn packing_restarts_positions_and_numbers_segments() {
        let rows = [sample(3, 10), sample(4, 20), sample(6, 30), sample(2, 40)];
        let batches = packed(&rows, 2, 8, 0);
        // Sequences: [3 + 4 (+1 pad)], [6 + 2]; one batch of two.
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!((b.batch_size, b.seq_len), (2, 8));
        assert_eq!(b.input_ids[..8], [10, 11, 12, 20, 21, 22, 23, 0]);
        assert_eq!(b.position_ids[..8], [0, 1, 2, 0, 1, 2, 3, 4]);
        assert_eq!(b.segment_ids, [1, 1, 1, 2, 2, 2, 2, 0, 1, 1, 1, 1, 1, 1, 2, 2]);
        assert_eq!(b.labels[3], IGNORE, "a packed row's first token is not trained");
        assert_eq!(b.labels[7], IGNORE);
        assert_eq!(b.position_ids[8..], [0, 1, 2, 3, 4, 5, 0, 1]);
        let tokens: usize = rows.iter().map(Sample::len).sum();
        assert_eq!(b.segment_ids.iter().filter(|&&s| s != 0).count(), tokens, "every token packed once");
    }

    #[test]
    fn padding_free_concatenates_each_micro_batch_into_one_sequence() {
        let rows = [sample(3, 10), sample(2, 20), sample(4, 30), sample(1, 40), sample(2, 50)];
        let batches = padding_free(&rows, 2);
        assert_eq!(batches.len(), 3);
        let b = &batches[0];
        assert_eq!((b.batch_size, b.seq_len), (1, 5));
        assert_eq!(b.input_ids, [10, 11, 12, 20, 21]);
        assert_eq!(b.labels, [IGNORE, 11, 12, IGNORE, 21]);
        assert_eq!(b.position_ids, [0, 1, 2, 0, 1]);
        assert_eq!(b.segment_ids, [1, 1, 1, 2, 2]);
        let b = &batches[1];
        assert_eq!((b.batch_size, b.seq_len), (1, 5));
        assert_eq!(b.position_ids, [0, 1, 2, 3, 0]);
        assert_eq!(b.segment_ids, [1, 1, 1, 1, 2]);
        let last = &batches[2];
        assert_eq!((last.batch_size, last.seq_len), (1, 2), "the last micro batch may be short");
        assert_eq!(last.input_ids, [50, 51]);
        assert_eq!(last.segment_ids, [1, 1]);
        let all: Vec<u32> = batches.iter().flat_map(|b| b.input_ids.iter().copied()).collect();
        let want: Vec<u32> = rows.iter().flat_map(|r| r.input_ids.iter().copied()).collect();
        assert_eq!(all, want, "every token once, in order, and no padding");
        assert!(padding_free(&[], 4).is_empty());
    }
}
