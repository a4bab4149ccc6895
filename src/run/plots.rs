//! Charts of a run's metrics as SVG files, as ms-swift leaves `images/` after a run: training
//! loss (raw and smoothed), eval loss, learning rate, gradient norm, tokens/s, device memory and
//! the GPU's busy share against the step, one file each in the run folder's `plots/`, redrawn at
//! every evaluation and at the end; `trainer plot RUN [RUN...]` draws them with several runs
//! overlaid.
//!
//! The SVG is written by hand (lines, ticks and text elements): no plotting crate to build and
//! no fonts to ship; any browser or image viewer renders it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The charts: file stem, title, and the metrics keys drawn on it (each a series).
const CHARTS: [(&str, &str, &[&str]); 7] = [
    ("loss", "training loss", &["loss", "loss_smoothed"]),
    ("eval_loss", "eval loss", &["eval_loss"]),
    ("lr", "learning rate", &["lr"]),
    ("grad_norm", "gradient norm", &["grad_norm"]),
    ("tokens_per_s", "tokens/s", &["tokens_per_s"]),
    ("memory", "device memory (GiB)", &["mem_reserved_gib", "mem_in_use_gib", "gpu_mem_used_gib"]),
    ("gpu_busy", "GPU busy (share of time a kernel ran)", &["gpu_busy"]),
];

/// A run's metrics: each key's `(step, value)` points in file order.
pub type RunMetrics = BTreeMap<String, Vec<(f64, f64)>>;

/// Read a metrics file (`metrics.jsonl`): every numeric key of every line with a `step`.
pub fn read_metrics(path: &Path) -> Result<RunMetrics> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read the metrics file: {e}")))?;
    let mut out = RunMetrics::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // A line cut short by a killed run is skipped, not fatal: the rest still draws.
        let Ok(serde_json::Value::Object(v)) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else { continue };
        for (k, value) in &v {
            if let (true, Some(x)) = (k != "step", value.as_f64()) {
                out.entry(k.clone()).or_default().push((step, x));
            }
        }
    }
    Ok(out)
}

/// Write the charts of `runs` (label and metrics; several are overlaid) into `dir`, each file
/// written whole then renamed into place. Returns the files written: a chart none of the runs
/// has a point for is left out.
pub fn write_charts(dir: &Path, runs: &[(String, RunMetrics)]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create the plots folder: {e}")))?;
    let mut written = Vec::new();
    for (stem, title, keys) in CHARTS {
        let mut series = Vec::new();
        for (label, metrics) in runs {
            for key in keys {
                if let Some(points) = metrics.get(*key).filter(|p| !p.is_empty()) {
                    // One run: its metrics by key; several: each series by run (and key).
                    let name = match (runs.len(), keys.len()) {
                        (1, _) => key.to_string(),
                        (_, 1) => label.clone(),
                        _ => format!("{label} {key}"),
                    };
                    series.push(Series { name, points: points.clone() });
                }
            }
        }
        if series.is_empty() {
            continue;
        }
        let path = dir.join(format!("{stem}.svg"));
        let part = dir.join(format!(".{stem}.svg.partial"));
        std::fs::write(&part, chart(title, &series)).map_err(|e| Error::file(&part, format!("cannot write: {e}")))?;
        std::fs::rename(&part, &path).map_err(|e| Error::file(&path, format!("cannot move into place: {e}")))?;
        written.push(path);
    }
    Ok(written)
}

/// The charts of one run, from its metrics file, in `run_dir/plots`.
pub fn plot_run(run_dir: &Path, metrics_file: &Path) -> Result<Vec<PathBuf>> {
    let metrics = read_metrics(metrics_file)?;
    write_charts(&run_dir.join("plots"), &[(run_label(run_dir), metrics)])
}

/// How charts name a run: its folder's name.
pub fn run_label(run_dir: &Path) -> String {
    run_dir.file_name().map_or_else(|| run_dir.display().to_string(), |n| n.to_string_lossy().into_owned())
}

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
/// Plot area margins: left (tick labels), right, top (title), bottom (ticks and axis label).
const MARGIN: (f64, f64, f64, f64) = (72.0, 24.0, 40.0, 52.0);
const COLORS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// One chart: the series as polylines (a lone point as a dot) over linear axes with round
/// ticks, a legend when there is more than one series.
fn chart(title: &str, series: &[Series]) -> String {
    let finite = |v: &f64| v.is_finite();
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).filter(finite);
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(finite);
    let (x0, x1) = bounds(xs);
    let (y0, y1) = bounds(ys);
    let (xt, yt) = (ticks(x0, x1), ticks(y0, y1));
    let (x0, x1) = (x0.min(xt[0]), x1.max(*xt.last().unwrap_or(&x1)));
    let (y0, y1) = (y0.min(yt[0]), y1.max(*yt.last().unwrap_or(&y1)));
    let (left, right, top, bottom) = MARGIN;
    let (w, h) = (WIDTH - left - right, HEIGHT - top - bottom);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * w;
    let py = |y: f64| top + h - (y - y0) / (y1 - y0) * h;
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#, WIDTH / 2.0, escape(title));
    for &t in &yt {
        let y = py(t);
        let _ = writeln!(s, r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/>"##, left + w);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, y + 4.0, label(t));
    }
    for &t in &xt {
        let x = px(t);
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##, top + h);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, top + h + 16.0, label(t));
    }
    let _ = writeln!(s, r##"<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#444"/>"##);
    let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#, left + w / 2.0, HEIGHT - 12.0);
    for (i, ser) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = ser.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        let _ = write!(s, r#"<g><title>{}</title>"#, escape(&ser.name));
        if let [(x, y)] = pts[..] {
            let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, px(x), py(y));
        } else {
            let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
            let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, path.join(" "));
        }
        let _ = writeln!(s, "</g>");
        if series.len() > 1 {
            let y = top + 14.0 + 16.0 * i as f64;
            let x = left + w - 10.0;
            let _ = writeln!(s, r#"<line x1="{:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"/>"#, x - 18.0, y - 4.0, y - 4.0);
            let _ = writeln!(s, r#"<text x="{:.1}" y="{y:.1}" text-anchor="end">{}</text>"#, x - 24.0, escape(&ser.name));
        }
    }
    s.push_str("</svg>\n");
    s
}

/// The range of `values`, widened when empty or flat so that the axis has a length.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * lo.abs().max(1.0) {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad, hi + pad);
    }
    (lo, hi)
}

/// About five round ticks (1, 2 or 5 times a power of ten apart) covering `lo..=hi`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|&s| s >= raw).unwrap_or(10.0 * power);
    let first = (lo / step).floor() * step;
    let mut out = Vec::new();
    let mut k = 0;
    while out.last().is_none_or(|&t: &f64| t < hi - step * 1e-9) && k < 100 {
        out.push(first + step * k as f64);
        k += 1;
    }
    out
}

/// A tick's text: short, exponent form for very large or small magnitudes.
fn label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tags balanced (every opened element closed in order, or self-closed): the file is
    /// well-formed XML as far as this writer's subset goes.
    pub(crate) fn well_formed(svg: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let Some(j) = rest[i..].find('>') else { return false };
            let tag = &rest[i + 1..i + j];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            }
            rest = &rest[i + j + 1..];
        }
        stack.is_empty()
    }

    #[test]
    fn round_ticks_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(2.31, 7.9);
        assert!(t[0] <= 2.31 && *t.last().unwrap() >= 7.9 && t.len() <= 8, "{t:?}");
        let t = ticks(1e-5, 3e-5);
        assert!(t.len() >= 3 && t.len() <= 8, "{t:?}");
        assert_eq!(label(2e-5), "2.0e-5");
        assert_eq!(label(0.25), "0.25");
        assert_eq!(label(1500.0), "1500");
        let (lo, hi) = bounds([3.0, 3.0].into_iter());
        assert!((lo - 2.7).abs() < 1e-9 && (hi - 3.3).abs() < 1e-9, "a flat series gets a range: {lo} {hi}");
    }

    #[test]
    fn charts_hold_one_series_per_metric_and_run() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let mut lines = String::new();
        for step in 1..=10 {
            let loss = 5.0 - step as f64 * 0.3;
            lines.push_str(&format!(
                "{{\"step\":{step},\"loss\":{loss},\"loss_smoothed\":{},\"lr\":1e-4,\"grad_norm\":0.5,\"tokens_per_s\":1200}}\n",
                loss + 0.1
            ));
        }
        lines.push_str("{\"step\":5,\"eval_loss\":3.9,\"eval_tokens\":100}\n{\"step\":10,\"eval_l");
        std::fs::write(&metrics, lines).unwrap();
        let m = read_metrics(&metrics).unwrap();
        assert_eq!(m["loss"].len(), 10);
        assert_eq!(m["eval_loss"], [(5.0, 3.9)], "the line cut short is skipped");
        let written = plot_run(dir.path(), &metrics).unwrap();
        let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["loss.svg", "eval_loss.svg", "lr.svg", "grad_norm.svg", "tokens_per_s.svg"], "no memory on CPU, no chart");
        let loss = std::fs::read_to_string(dir.path().join("plots/loss.svg")).unwrap();
        assert!(well_formed(&loss) && loss.starts_with("<svg"));
        assert_eq!(loss.matches("<polyline").count(), 2, "raw and smoothed loss");
        let eval = std::fs::read_to_string(dir.path().join("plots/eval_loss.svg")).unwrap();
        assert_eq!((eval.matches("<circle").count(), eval.matches("<polyline").count()), (1, 0), "one evaluation: a dot");
        // Two runs overlaid: one series per run and metric, a legend naming the runs.
        let other = m.clone();
        let out = dir.path().join("compare");
        write_charts(&out, &[("a".into(), m), ("b<2>".into(), other)]).unwrap();
        let lr = std::fs::read_to_string(out.join("lr.svg")).unwrap();
        assert!(well_formed(&lr));
        assert_eq!(lr.matches("<polyline").count(), 2);
        assert!(lr.contains(">b&lt;2&gt;</text>"), "labels escaped");
        assert!(!std::fs::read_dir(&out).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".partial")));
    }
}
