//! Mixing sources into a training and a validation set, with ms-swift's meaning of `source#N`
//! and `--split_dataset_ratio`. Everything is seeded by `train.seed`: the same recipe gives the
//! same rows in the same order.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Rows of one source and its `#N`, if any.
pub struct SourceRows<T> {
    pub rows: Vec<T>,
    pub sample: Option<usize>,
}

/// Training and validation rows, each shuffled, and how many of each every source gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Split<T> {
    pub train: Vec<T>,
    pub val: Vec<T>,
    /// `(train, val)` rows per source, in the sources' order.
    pub per_source: Vec<(usize, usize)>,
}

/// Per source: sample (`#N`), then hold out `round(len * val_split)` rows for validation; then
/// concatenate the sources and shuffle each set.
///
/// `#N` as ms-swift's `sample_dataset`: N below the source's length takes N distinct rows at
/// random; N above repeats every row `N div len` times and adds `N mod len` distinct rows at
/// random; no `#N` takes every row once.
pub fn mix<T: Clone>(sources: Vec<SourceRows<T>>, val_split: f64, seed: u64) -> Split<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut per_source = Vec::new();
    for source in sources {
        let mut rows = sample(source.rows, source.sample, &mut rng);
        // Shuffle before holding out so validation is a random subset, not the file's tail.
        rows.shuffle(&mut rng);
        let held_out = ((rows.len() as f64) * val_split).round() as usize;
        let held_out = held_out.min(rows.len());
        val.extend(rows.drain(rows.len() - held_out..));
        per_source.push((rows.len(), held_out));
        train.extend(rows);
    }
    train.shuffle(&mut rng);
    val.shuffle(&mut rng);
    Split { train, val, per_source }
}

/// `#N` applied to one source's rows.
fn sample<T: Clone>(rows: Vec<T>, n: Option<usize>, rng: &mut ChaCha8Rng) -> Vec<T> {
    let len = rows.len();
    let Some(n) = n else { return rows };
    if len == 0 {
        return rows;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n / len {
        out.extend(rows.iter().cloned());
    }
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(rng);
    out.extend(order[..n % len].iter().map(|&i| rows[i].clone()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(len: usize, offset: usize, sample: Option<usize>) -> SourceRows<usize> {
        SourceRows { rows: (offset..offset + len).collect(), sample }
    }

    fn sorted(mut v: Vec<usize>) -> Vec<usize> {
        v.sort_unstable();
        v
    }

    #[test]
    fn sampling_below_takes_distinct_rows_above_repeats() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let below = sample((0..10).collect::<Vec<usize>>(), Some(4), &mut rng);
        assert_eq!(below.len(), 4);
        let distinct = sorted(below.clone());
        assert!(distinct.windows(2).all(|w| w[0] != w[1]), "{below:?}");
        let above = sorted(sample((0..10).collect(), Some(25), &mut rng));
        // Every row twice, five rows a third time.
        let counts: Vec<usize> = (0..10).map(|r| above.iter().filter(|&&x| x == r).count()).collect();
        assert_eq!(counts.iter().filter(|&&c| c == 3).count(), 5);
        assert_eq!(counts.iter().filter(|&&c| c == 2).count(), 5);
        assert_eq!(sample((0..10).collect(), None, &mut rng), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn val_split_is_per_source_and_everything_is_seeded() {
        let make = || vec![source(10, 0, None), source(20, 100, Some(5))];
        let a = mix(make(), 0.2, 7);
        // round(10 * 0.2) = 2 and round(5 * 0.2) = 1 held out.
        assert_eq!((a.train.len(), a.val.len()), (12, 3));
        assert_eq!(a.val.iter().filter(|&&r| r >= 100).count(), 1);
        let all = sorted(a.train.iter().chain(&a.val).copied().collect());
        assert_eq!(all.iter().filter(|&&r| r < 100).count(), 10);
        assert_eq!(mix(make(), 0.2, 7), a, "same seed, same split and order");
        assert_ne!(mix(make(), 0.2, 8), a, "another seed, another order");
        // Shuffled: the first source's rows are not all first.
        assert!(a.train[..8].iter().any(|&r| r >= 100), "{:?}", a.train);
    }
}
