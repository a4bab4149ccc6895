//! Where a step's time goes: named spans timed with the device synchronised at both ends.
//!
//! Off unless [`enable`]d (`trainer bench --profile`), and then only the calling thread's
//! spans count. Synchronising serialises the host with the device, so a profiled step is slower
//! than a timed one; the breakdown is meant for shares, not totals. Spans nest: a span's name is
//! its path (`layer/attention/core`), and a parent's time includes its children's.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::backend::Backend;

#[derive(Default)]
struct State {
    on: bool,
    stack: Vec<&'static str>,
    /// Path → (seconds, calls).
    spans: BTreeMap<String, (f64, usize)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Start (or stop) recording spans on this thread; starting clears what was recorded.
pub fn enable(on: bool) {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.on = on;
        if on {
            s.spans.clear();
            s.stack.clear();
        }
    });
}

/// Run `f` as span `name`: when recording, the device is synchronised before and after, and the
/// time between is added to the span's path.
pub fn span<B: Backend, T>(name: &'static str, device: &B::Device, f: impl FnOnce() -> T) -> T {
    if !STATE.with(|s| s.borrow().on) {
        return f();
    }
    let _ = B::sync(device);
    STATE.with(|s| s.borrow_mut().stack.push(name));
    let t = Instant::now();
    let out = f();
    let _ = B::sync(device);
    let secs = t.elapsed().as_secs_f64();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let path = s.stack.join("/");
        s.stack.pop();
        let e = s.spans.entry(path).or_insert((0.0, 0));
        e.0 += secs;
        e.1 += 1;
    });
    out
}

/// One span's totals since [`enable`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpanTotal {
    pub path: String,
    pub seconds: f64,
    pub calls: usize,
}

/// The spans recorded since [`enable`], by path.
pub fn totals() -> Vec<SpanTotal> {
    STATE.with(|s| s.borrow().spans.iter().map(|(p, &(seconds, calls))| SpanTotal { path: p.clone(), seconds, calls }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    type B = burn::backend::NdArray<f32>;

    #[test]
    fn spans_nest_by_path_and_count_calls_only_while_enabled() {
        let d = Default::default();
        span::<B, _>("ignored", &d, || ());
        enable(true);
        for _ in 0..2 {
            span::<B, _>("layer", &d, || span::<B, _>("mlp", &d, || std::thread::sleep(std::time::Duration::from_millis(2))));
        }
        let t = totals();
        enable(false);
        let paths: Vec<_> = t.iter().map(|s| (s.path.as_str(), s.calls)).collect();
        assert_eq!(paths, [("layer", 2), ("layer/mlp", 2)]);
        assert!(t[0].seconds >= t[1].seconds && t[1].seconds >= 0.004, "{t:?}");
        span::<B, _>("after", &d, || ());
        assert_eq!(totals().len(), 2);
    }
}
