//! Training: the optimizer step over a global batch ([`trainer`]), AdamW ([`optimizer`]), the
//! learning-rate schedule, layer recompute, checkpoints and the `trainer run` loop ([`run`]).

pub mod bench;
pub mod bench_loss;
pub mod checkpoint;
pub mod metrics;
pub mod names;
pub mod optimizer;
pub mod recompute;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use schedule::LrSchedule;
pub use trainer::{StepStats, Trainer};
