//! Where a mixture of experts' routed slots sit while the experts run: contiguous runs of
//! experts ("chunks"), each run one batched GEMM over `[experts, capacity, hidden]`, every
//! expert of a run padded to the run's busiest. One run over all experts pads every expert to the
//! busiest of all, and routers are rarely balanced (random weights least of all: one expert can
//! draw most tokens), so the runs are cut where that saves the most rows. Grouped GEMMs
//! ([`ExpertGemm::Grouped`], the default) need no padding: every expert is a run of its own with
//! exactly its rows.

/// A run of local experts `first .. first + len`, each given `capacity` rows (padded: a multiple
/// of 8; grouped: one expert, its rows) from row `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Chunk {
    pub first: usize,
    pub len: usize,
    pub capacity: usize,
    pub offset: usize,
}

impl Chunk {
    pub fn rows(&self) -> usize {
        self.len * self.capacity
    }
}

/// At most this many runs (batched GEMMs a projection).
const MAX_CHUNKS: usize = 8;
/// What one more run costs, in rows: about a GEMM launch's worth at these widths.
const ROWS_PER_CHUNK: usize = 1024;

/// Runs covering `counts` (slots per local expert) with the fewest padded rows, a run costing
/// [`ROWS_PER_CHUNK`] more, at most `max` runs: `(first, len, capacity)` in order.
fn chunk_experts(counts: &[usize], max: usize) -> Vec<(usize, usize, usize)> {
    let n = counts.len();
    let cap = |most: usize| most.next_multiple_of(8);
    // best[g][j]: the least cost of experts 0..j in g runs; from[g][j]: where the last run starts.
    let mut best = vec![vec![usize::MAX; n + 1]; max + 1];
    let mut from = vec![vec![0; n + 1]; max + 1];
    best[0][0] = 0;
    for g in 1..=max {
        for j in 1..=n {
            let mut most = 0;
            for i in (0..j).rev() {
                most = most.max(counts[i]);
                if best[g - 1][i] == usize::MAX {
                    continue;
                }
                let cost = best[g - 1][i] + (j - i) * cap(most) + ROWS_PER_CHUNK;
                if cost < best[g][j] {
                    best[g][j] = cost;
                    from[g][j] = i;
                }
            }
        }
    }
    let g = (1..=max).min_by_key(|&g| best[g][n]).unwrap_or(1);
    let (mut runs, mut j, mut g) = (Vec::new(), n, g);
    while j > 0 {
        let i = from[g][j];
        runs.push((i, j - i, cap(counts[i..j].iter().copied().max().unwrap_or(0))));
        (j, g) = (i, g - 1);
    }
    runs.reverse();
    runs
}

/// How a mixture of experts' rows are laid out for the experts' GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertGemm {
    /// Every expert on exactly its rows, each projection one grouped GEMM over all experts.
    #[default]
    Grouped,
    /// Runs of experts padded to the run's busiest expert, each run and projection one batched
    /// GEMM (what trainer did before grouped GEMMs; kept to compare).
    Padded,
}

impl ExpertGemm {
    /// From `TRAINER_EXPERT_GEMM` (`grouped`, the default, or `padded`).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("TRAINER_EXPERT_GEMM").as_deref() {
            Err(_) | Ok("grouped") => Ok(ExpertGemm::Grouped),
            Ok("padded") => Ok(ExpertGemm::Padded),
            Ok(other) => Err(format!("TRAINER_EXPERT_GEMM={other:?}: expected \"grouped\" or \"padded\"")),
        }
    }
}

/// Where a mixture of experts' routed slots are laid out when every expert is held here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertRouting {
    /// On the device: one kernel orders the slots by expert, only the per-expert counts come
    /// back to the host (grouped GEMMs only; padded runs and expert parallelism use the host's).
    #[default]
    Device,
    /// The choices read to the host and laid out there (what trainer did before; kept to compare).
    Host,
}

impl ExpertRouting {
    /// From `TRAINER_ROUTING` (`device`, the default, or `host`).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("TRAINER_ROUTING").as_deref() {
            Err(_) | Ok("device") => Ok(ExpertRouting::Device),
            Ok("host") => Ok(ExpertRouting::Host),
            Ok(other) => Err(format!("TRAINER_ROUTING={other:?}: expected \"device\" or \"host\"")),
        }
    }
}

/// The runs that lay out `counts` (rows per local expert), each with its first row; a run whose
/// experts got nothing is left out. Grouped: every expert with rows a run of its own, exactly
/// its rows.
pub(super) fn runs(counts: &[usize], gemm: ExpertGemm) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut offset = 0;
    let runs = match gemm {
        ExpertGemm::Padded => chunk_experts(counts, MAX_CHUNKS),
        ExpertGemm::Grouped => counts.iter().enumerate().map(|(e, &c)| (e, 1, c)).collect(),
    };
    for (first, len, capacity) in runs {
        if capacity > 0 {
            chunks.push(Chunk { first, len, capacity, offset });
            offset += len * capacity;
        }
    }
    chunks
}

/// The first row of each local expert in `runs` (experts outside every run: none).
pub(super) fn first_rows(runs: &[Chunk], local: usize) -> Vec<Option<usize>> {
    let mut first = vec![None; local];
    for run in runs {
        for e in run.first..run.first + run.len {
            first[e] = Some(run.offset + (e - run.first) * run.capacity);
        }
    }
    first
}

/// The slots routed to the `local` experts from `first`, laid out in [`Chunk`]s: expert `e`'s
/// slots in token order from its first row, then padding rows (reading token 0; their outputs
/// are never read).
#[derive(Debug, PartialEq)]
pub(super) struct ExpertLayout {
    /// The runs that have rows (a run whose experts got no slot is left out).
    pub chunks: Vec<Chunk>,
    /// `[rows]`: the token each row reads (0 for padding).
    pub row_token: Vec<i64>,
    /// `[rows]`: the routing slot (`token * top_k + k`) each row serves (0 for padding).
    pub row_slot: Vec<i64>,
    /// `[rows]`: rows that serve a slot.
    pub row_real: Vec<bool>,
    /// `[slots]`: the row serving each slot (0 for a slot of an expert held elsewhere).
    pub slot_row: Vec<i64>,
    /// `[slots]`: slots of the experts held here; `None` when all are.
    pub slot_local: Option<Vec<bool>>,
}

impl ExpertLayout {
    /// From the router's choices (`chosen[token * top_k + k]`, global expert indices) for the
    /// `local` experts from `first`; `None` when none of them got a slot.
    pub fn new(chosen: &[i64], top_k: usize, first: usize, local: usize, gemm: ExpertGemm) -> Option<Self> {
        let mut slots_of: Vec<Vec<i64>> = vec![Vec::new(); local];
        for (slot, &expert) in chosen.iter().enumerate() {
            let e = expert - first as i64;
            if (0..local as i64).contains(&e) {
                slots_of[e as usize].push(slot as i64);
            }
        }
        let counts: Vec<usize> = slots_of.iter().map(Vec::len).collect();
        if counts.iter().all(|&c| c == 0) {
            return None;
        }
        let chunks = runs(&counts, gemm);
        let rows = chunks.iter().map(Chunk::rows).sum();
        let (mut row_slot, mut row_real) = (vec![0i64; rows], vec![false; rows]);
        let (mut slot_row, mut slot_local) = (vec![0i64; chosen.len()], vec![false; chosen.len()]);
        for (slots, first) in slots_of.iter().zip(first_rows(&chunks, local)) {
            for (row, &slot) in (first.unwrap_or(0)..).zip(slots) {
                row_slot[row] = slot;
                row_real[row] = true;
                slot_row[slot as usize] = row as i64;
                slot_local[slot as usize] = true;
            }
        }
        let row_token = row_slot.iter().zip(&row_real).map(|(&s, &real)| if real { s / top_k as i64 } else { 0 }).collect();
        let slot_local = slot_local.contains(&false).then_some(slot_local);
        Some(ExpertLayout { chunks, row_token, row_slot, row_real, slot_row, slot_local })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cut_where_they_save_rows() {
        // Balanced: one run (a second would cost more than it saves).
        assert_eq!(chunk_experts(&[8, 8, 7, 8], MAX_CHUNKS), vec![(0, 4, 8)]);
        // One hot expert among 64 quiet ones: it runs alone.
        let mut counts = vec![16; 64];
        counts[20] = 4000;
        let runs = chunk_experts(&counts, MAX_CHUNKS);
        assert!(runs.contains(&(20, 1, 4000)), "{runs:?}");
        let rows: usize = runs.iter().map(|(_, len, cap)| len * cap).sum();
        assert!(rows < 4000 + 64 * 16 + 16 * 8, "{rows} rows in {runs:?}");
        // The runs cover every expert once, in order.
        let mut next = 0;
        for (first, len, _) in &runs {
            assert_eq!(*first, next);
            next += len;
        }
        assert_eq!(next, 64);
        assert!(runs.len() <= MAX_CHUNKS);
    }

    #[test]
    fn layout_maps_slots_and_rows_both_ways() {
        // 3 tokens, top 2, experts 2..5 local (global 0..6).
        let chosen = [2, 0, 3, 2, 5, 4];
        let l = ExpertLayout::new(&chosen, 2, 2, 3, ExpertGemm::Padded).expect("local experts got tokens");
        assert_eq!(l.chunks, vec![Chunk { first: 0, len: 3, capacity: 8, offset: 0 }]);
        // Expert 2: slots 0 and 3; expert 3: slot 2; expert 4: slot 5; slots 1 (expert 0) and
        // 4 (expert 5) are held elsewhere.
        for (row, slot) in [(0, 0), (1, 3), (8, 2), (16, 5)] {
            assert!(l.row_real[row]);
            assert_eq!((l.row_slot[row], l.row_token[row], l.slot_row[slot as usize]), (slot, slot / 2, row as i64));
        }
        assert_eq!(l.row_real.iter().filter(|&&r| r).count(), 4, "every other row is padding");
        assert_eq!(l.slot_local, Some(vec![true, false, true, true, false, true]));
        assert_eq!(ExpertLayout::new(&chosen, 2, 6, 2, ExpertGemm::Padded), None, "no token for experts 6..8");
        // A hot expert 0 with 300 slots, experts 1..40 with one each, 40..64 none: the hot one runs
        // alone (one run would be 64 x 304 rows), and every slot maps to a row that maps back.
        let mut busy: Vec<i64> = vec![0; 300];
        busy.extend(1..40);
        let l = ExpertLayout::new(&busy, 1, 0, 64, ExpertGemm::Padded).expect("slots");
        assert_eq!(l.chunks[0], Chunk { first: 0, len: 1, capacity: 304, offset: 0 });
        assert!(l.row_token.len() <= 304 + 63 * 8, "{:?}", l.chunks);
        assert_eq!(l.row_token.len(), l.chunks.iter().map(Chunk::rows).sum::<usize>());
        for (slot, &row) in l.slot_row.iter().enumerate() {
            assert_eq!(l.row_slot[row as usize], slot as i64);
        }
        assert_eq!(l.slot_local, None);
        // Grouped: every expert with slots is a run of its own rows, no padding.
        let l = ExpertLayout::new(&chosen, 2, 2, 3, ExpertGemm::Grouped).expect("local experts got tokens");
        let expect = [Chunk { first: 0, len: 1, capacity: 2, offset: 0 }, Chunk { first: 1, len: 1, capacity: 1, offset: 2 }, Chunk { first: 2, len: 1, capacity: 1, offset: 3 }];
        assert_eq!(l.chunks, expect);
        assert!(l.row_real.iter().all(|&r| r));
        assert_eq!(l.row_slot, [0, 3, 2, 5]);
        assert_eq!(l.row_token, [0, 1, 1, 2]);
        let l = ExpertLayout::new(&busy, 1, 0, 64, ExpertGemm::Grouped).expect("slots");
        assert_eq!(l.row_token.len(), busy.len(), "exactly the slots");
        assert_eq!(l.chunks.len(), 40, "experts without slots get no run");
    }
}
