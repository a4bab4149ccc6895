//! Where a step's time and memory go: named spans timed with the device synchronised at both
//! ends, and on a device with an allocator the memory live tensors hold when each span ends and
//! how much the pools grew inside it.
//!
//! Off unless [`enable`]d (`trainer bench --profile`), and then only the calling thread's
//! spans count. Synchronising serialises the host with the device, so a profiled step is slower
//! than a timed one; the breakdown is meant for shares, not totals. [`Level::Coarse`] times only
//! the step's phases and the attention core ([`COARSE`]): a few synchronisations per layer
//! instead of ~15, so the phases' totals (the forward outside the core, say) are close to what
//! an unprofiled step spends on them. Spans nest: a span's name is
//! its path (`layer/attention/core`), and a parent's time includes its children's. The pools
//! keep what they reserve, so the spans whose growth is not zero are where the step's
//! high-water mark was set.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use kernels_cubecl::DeviceMemoryBackend;

use super::gib;

/// How much of a step [`span`] times.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    #[default]
    Off,
    /// Only the spans named in [`COARSE`].
    Coarse,
    /// Every span.
    Fine,
}

/// The spans [`Level::Coarse`] times: a step's phases and the attention core.
pub const COARSE: [&str; 7] = ["forward", "recompute", "backward", "head", "optimizer", "data_parallel", "core"];

#[derive(Default)]
struct State {
    level: Level,
    stack: Vec<&'static str>,
    spans: BTreeMap<String, Totals>,
}

#[derive(Default, Clone, Copy)]
struct Totals {
    seconds: f64,
    calls: usize,
    /// `None` on a backend without a device allocator.
    memory: Option<SpanMemory>,
}

/// Bytes: the most in use at the span's end, and the pools' growth inside it over its calls.
#[derive(Default, Clone, Copy)]
struct SpanMemory {
    in_use: u64,
    growth: u64,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Start (or stop: [`Level::Off`]) recording spans on this thread; starting clears what was
/// recorded.
pub fn enable(level: Level) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.level = level;
        if level != Level::Off {
            s.spans.clear();
            s.stack.clear();
        }
    });
}

/// Run `f` as span `name`: when recording it (see [`Level`]), the device is synchronised before
/// and after, and the time between is added to the span's path (the recorded spans it runs
/// in), with the device's memory after it.
pub fn span<B: DeviceMemoryBackend, T>(name: &'static str, device: &B::Device, f: impl FnOnce() -> T) -> T {
    let recorded = STATE.with(|s| match s.borrow().level {
        Level::Off => false,
        Level::Coarse => COARSE.contains(&name),
        Level::Fine => true,
    });
    if !recorded {
        return f();
    }
    let _ = B::sync(device);
    let before = B::device_memory(device);
    STATE.with(|s| s.borrow_mut().stack.push(name));
    let t = Instant::now();
    let out = f();
    let _ = B::sync(device);
    let secs = t.elapsed().as_secs_f64();
    let after = B::device_memory(device);
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let path = s.stack.join("/");
        s.stack.pop();
        let e = s.spans.entry(path).or_default();
        e.seconds += secs;
        e.calls += 1;
        if let (Some(before), Some(after)) = (before, after) {
            let m = e.memory.get_or_insert_with(SpanMemory::default);
            m.in_use = m.in_use.max(after.in_use);
            m.growth += after.reserved.saturating_sub(before.reserved);
        }
    });
    out
}

/// One span's totals since [`enable`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpanTotal {
    pub path: String,
    pub seconds: f64,
    pub calls: usize,
    /// The most GiB live tensors held at the span's end; `None` without a device allocator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_use_gib: Option<f64>,
    /// GiB the allocator's pools grew by inside the span, over all its calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_growth_gib: Option<f64>,
}

/// The spans recorded since [`enable`], by path.
pub fn totals() -> Vec<SpanTotal> {
    STATE.with(|s| {
        let spans = &s.borrow().spans;
        spans
            .iter()
            .map(|(p, t)| SpanTotal {
                path: p.clone(),
                seconds: t.seconds,
                calls: t.calls,
                in_use_gib: t.memory.map(|m| gib(m.in_use)),
                reserved_growth_gib: t.memory.map(|m| gib(m.growth)),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    type B = burn::backend::NdArray<f32>;

    #[test]
    fn spans_nest_by_path_and_count_calls_only_while_enabled() {
        let d = Default::default();
        span::<B, _>("ignored", &d, || ());
        enable(Level::Fine);
        for _ in 0..2 {
            span::<B, _>("layer", &d, || span::<B, _>("mlp", &d, || std::thread::sleep(std::time::Duration::from_millis(2))));
        }
        let t = totals();
        enable(Level::Off);
        let paths: Vec<_> = t.iter().map(|s| (s.path.as_str(), s.calls)).collect();
        assert_eq!(paths, [("layer", 2), ("layer/mlp", 2)]);
        assert!(t.iter().all(|s| s.in_use_gib.is_none() && s.reserved_growth_gib.is_none()), "no device allocator on NdArray");
        assert!(t[0].seconds >= t[1].seconds && t[1].seconds >= 0.004, "{t:?}");
        span::<B, _>("after", &d, || ());
        assert_eq!(totals().len(), 2);
    }

    #[test]
    fn coarse_level_times_only_the_phases_and_the_core() {
        let d = Default::default();
        enable(Level::Coarse);
        span::<B, _>("forward", &d, || span::<B, _>("layer", &d, || span::<B, _>("attention", &d, || span::<B, _>("core", &d, || ()))));
        span::<B, _>("mlp", &d, || ());
        let paths: Vec<_> = totals().into_iter().map(|s| s.path).collect();
        enable(Level::Off);
        assert_eq!(paths, ["forward", "forward/core"]);
    }
}
