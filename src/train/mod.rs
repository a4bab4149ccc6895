//! Training: the learning-rate schedule (the loop, optimizer and checkpoints build on it).

pub mod schedule;

pub use schedule::LrSchedule;
