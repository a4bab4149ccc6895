//! Training: the optimizer step over a global batch ([`trainer`]), AdamW ([`optimizer`]), the
//! learning-rate schedule, layer recompute, interrupts and the `trainer run` loop ([`run`]);
//! the run folder and its checkpoints are [`crate::run`]'s.

pub mod bench;
pub mod bench_attention;
pub mod bench_loss;
pub mod checkpoints;
pub mod distributed_optimizer;
pub mod init;
pub mod interrupt;
pub mod metrics;
pub mod names;
pub mod optimizer;
pub mod preflight;
pub mod recompute;
pub mod run;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use schedule::LrSchedule;
pub use trainer::{StepStats, Trainer};
