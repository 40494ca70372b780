//! Pictures of a run: `hpc-ckpt status RUN_DIR --plot FILE.svg` and the loss sparkline of
//! `status`'s text view.
//!
//! The SVG shows the training loss (top) and the eval metric (bottom, when the run has one)
//! against the step, as `metrics.jsonl` recorded them ([`crate::storage::metrics`]), one colour
//! per allocation, with a vertical marker at each interruption labelled with its kind
//! (announced or unannounced), the steps the next allocation redid shaded, and its resume point
//! marked. Allocations and interruptions come from the journal's one fold
//! ([`history::fold`]). Drawn with plotters' SVG backend alone: its text is SVG `<text>`, so no
//! font library is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::storage::lock;
use crate::storage::metrics::{self, Record, METRICS_FILE};
use crate::supervision::events;
use crate::supervision::history::{self, Chain, Interruption};

/// The picture's size, pixels.
const SIZE: (u32, u32) = (1000, 600);
/// Metrics that are not the loss or an eval metric (the last two: the fp16 loss scaler's).
const NOT_EVAL: [&str; 5] = ["loss", "lr", "samples_per_s", "loss_scale", "skipped_steps"];
/// One colour per allocation (cycled).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
];
const REDONE: RGBColor = RGBColor(214, 39, 40);

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(
        "no metrics to plot in {path}: it is missing or has no record with a `loss` (the \
         built-in trainer writes one each step; a wrapped program's commits write theirs). Run \
         some training first, or check the run dir"
    )]
    NoMetrics { path: PathBuf },
    #[error(
        "cannot write the plot to {path}: {source} (check that its directory exists and is \
         writable, or pass another --plot FILE)"
    )]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw the plot: {0}")]
    Draw(String),
}

/// What a plot shows, in numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Plotted {
    /// Allocations with at least one point.
    pub allocations: usize,
    pub interruptions: usize,
    pub points: usize,
    /// The eval metric's name, when drawn.
    pub eval_metric: Option<String>,
}

/// One allocation's points.
struct Segment {
    alloc: usize,
    records: Vec<Record>,
}

/// An interruption as drawn: at the step the interrupted allocation reached, and where the next
/// one resumed.
struct Mark {
    step: u64,
    kind: Interruption,
    resumed_from: Option<u64>,
}

/// Draw the run in `run_dir` into the SVG file `out`.
pub fn plot(run_dir: &Path, out: &Path) -> Result<Plotted, PlotError> {
    let (records, _) = metrics::read(run_dir);
    let chain = history::fold(&events::read(run_dir).0);
    let running = lock::probe(run_dir).is_some();
    let svg = render(&records, &chain, running).ok_or_else(|| PlotError::NoMetrics {
        path: run_dir.join(METRICS_FILE),
    })??;
    std::fs::write(out, svg.0).map_err(|source| PlotError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(svg.1)
}

/// The SVG text of a run's picture; None when no record has a loss.
pub fn render(
    records: &[Record],
    chain: &Chain,
    running: bool,
) -> Option<Result<(String, Plotted), PlotError>> {
    let segments = segments(records, chain);
    if !segments.iter().any(|s| has(&s.records, "loss")) {
        return None;
    }
    let marks = marks(&segments, chain, running);
    let eval = eval_metric(records);
    let mut svg = String::new();
    let drawn = draw(&mut svg, &segments, &marks, eval.as_deref())
        .map_err(|e| PlotError::Draw(e.to_string()));
    Some(drawn.map(|()| {
        let plotted = Plotted {
            allocations: segments.len(),
            interruptions: marks.len(),
            points: segments.iter().map(|s| s.records.len()).sum(),
            eval_metric: eval,
        };
        (svg, plotted)
    }))
}

fn has(records: &[Record], metric: &str) -> bool {
    records.iter().any(|r| r.metrics.contains_key(metric))
}

/// The eval metric: a metric other than the loss, learning rate and throughput, preferring a
/// name that says so (`val…`, `eval…`).
fn eval_metric(records: &[Record]) -> Option<String> {
    let names: Vec<&String> = records
        .iter()
        .flat_map(|r| r.metrics.keys())
        .filter(|k| !NOT_EVAL.contains(&k.as_str()))
        .collect();
    names
        .iter()
        .find(|k| k.starts_with("val") || k.starts_with("eval"))
        .or(names.first())
        .map(|k| k.to_string())
}

/// The records by allocation: by time against the allocations' starts where both are known,
/// else a new allocation wherever the step goes back (a resume).
fn segments(records: &[Record], chain: &Chain) -> Vec<Segment> {
    let starts: Vec<Option<SystemTime>> = chain.allocations.iter().map(|a| a.started_at).collect();
    let by_time = !starts.is_empty()
        && starts.iter().all(Option::is_some)
        && records.iter().all(|r| r.ts.is_some());
    let mut out: Vec<Segment> = Vec::new();
    let mut guess = 0usize;
    let mut prev_step: Option<u64> = None;
    for r in records {
        let alloc = if by_time {
            let ts = r.ts.expect("checked");
            starts
                .iter()
                .rposition(|s| s.is_some_and(|s| s <= ts))
                .unwrap_or(0)
        } else {
            if prev_step.is_some_and(|p| r.step <= p) {
                guess += 1;
            }
            guess
        };
        prev_step = Some(r.step);
        match out.last_mut() {
            Some(s) if s.alloc == alloc => s.records.push(r.clone()),
            _ => out.push(Segment {
                alloc,
                records: vec![r.clone()],
            }),
        }
    }
    out
}

/// Each interruption between drawn allocations (or after the last one).
fn marks(segments: &[Segment], chain: &Chain, running: bool) -> Vec<Mark> {
    let mut out = Vec::new();
    for (k, s) in segments.iter().enumerate() {
        let Some(kind) = (s.alloc < chain.allocations.len())
            .then(|| chain.interruption_of(s.alloc, running))
            .flatten()
        else {
            continue;
        };
        let a = &chain.allocations[s.alloc];
        let last_logged = s.records.iter().map(|r| r.step).max().unwrap_or(0);
        let step = a.reached_step.unwrap_or(0).max(last_logged);
        let next = segments.get(k + 1);
        let resumed_from = next.map(|n| {
            chain
                .allocations
                .get(n.alloc)
                .and_then(|a| a.resume_step)
                .unwrap_or_else(|| n.records[0].step.saturating_sub(1))
        });
        out.push(Mark {
            step,
            kind,
            resumed_from,
        });
    }
    out
}

fn kind_label(k: Interruption) -> &'static str {
    match k {
        Interruption::Announced => "announced",
        Interruption::Unannounced => "unannounced",
    }
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(svg: &mut String, segments: &[Segment], marks: &[Mark], eval: Option<&str>) -> DrawResult {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Training across allocations (hpc-ckpt status --plot)",
        ("sans-serif", 22),
    )?;
    let panels: Vec<(DrawingArea<_, _>, &str)> = match eval {
        Some(e) if segments.iter().any(|s| has(&s.records, e)) => {
            let (top, bottom) = root.split_vertically(SIZE.1 as i32 * 55 / 100);
            vec![(top, "loss"), (bottom, e)]
        }
        _ => vec![(root, "loss")],
    };
    let (x0, x1) = step_range(segments, marks);
    for (i, (area, metric)) in panels.iter().enumerate() {
        panel(area, metric, segments, marks, (x0, x1), i == 0)?;
    }
    Ok(())
}

/// The step axis: every point and mark, with a little room.
fn step_range(segments: &[Segment], marks: &[Mark]) -> (f64, f64) {
    let steps = segments
        .iter()
        .flat_map(|s| s.records.iter().map(|r| r.step))
        .chain(
            marks
                .iter()
                .flat_map(|m| [Some(m.step), m.resumed_from])
                .flatten(),
        );
    let (lo, hi) = steps.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let (lo, hi) = (lo.min(hi) as f64, hi as f64);
    let pad = ((hi - lo) * 0.02).max(1.0);
    ((lo - pad).max(0.0), hi + pad)
}

/// The chart of one panel: steps across, the metric up.
type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One panel: `metric` by step, each allocation its own curve, over the redone spans, with the
/// interruptions marked. The first panel also carries the labels and the legend.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    metric: &str,
    segments: &[Segment],
    marks: &[Mark],
    (x0, x1): (f64, f64),
    first: bool,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (y0, y1) = value_range(metric, segments, first);
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    // Enough decimals to tell the y ticks apart, and whole steps.
    let decimals = (1.0 - (y1 - y0).log10().floor()).clamp(0.0, 6.0) as usize;
    let y_fmt = move |v: &f64| format!("{v:.decimals$}");
    chart
        .configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&y_fmt)
        .x_desc("step")
        .y_desc(metric)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    // Redone spans first, under the curves.
    draw_redone(&mut chart, marks, (y0, y1), first)?;
    draw_curves(&mut chart, metric, segments, first)?;
    draw_marks(&mut chart, marks, (x0, x1), (y0, y1), first)?;
    if first {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    Ok(())
}

/// The value axis of `metric`: every finite value, with a little room (more above the curves
/// of the first panel, for the interruption labels).
fn value_range(metric: &str, segments: &[Segment], first: bool) -> (f64, f64) {
    let values: Vec<f64> = segments
        .iter()
        .flat_map(|s| s.records.iter().filter_map(|r| r.metrics.get(metric)))
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let (lo, hi) = if values.is_empty() {
        (0.0, 1.0)
    } else {
        (lo, hi)
    };
    let pad = ((hi - lo) * 0.08).max(1e-6);
    (lo - pad, hi + pad * if first { 3.5 } else { 1.0 })
}

/// Shade the steps each interruption made the run redo (from its resume point to its step).
fn draw_redone<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    marks: &[Mark],
    (y0, y1): (f64, f64),
    first: bool,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let mut shaded = false;
    for m in marks {
        if let Some(r) = m.resumed_from.filter(|r| *r < m.step) {
            let s = chart.draw_series(std::iter::once(Rectangle::new(
                [(r as f64, y0), (m.step as f64, y1)],
                REDONE.mix(0.12).filled(),
            )))?;
            if first && !shaded {
                s.label("steps redone").legend(|(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 18, y + 5)], REDONE.mix(0.25).filled())
                });
            }
            shaded = true;
        }
    }
    Ok(())
}

/// One curve per allocation (a lone point as a dot).
fn draw_curves<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    metric: &str,
    segments: &[Segment],
    first: bool,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    for s in segments {
        let color = PALETTE[s.alloc % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s
            .records
            .iter()
            .filter_map(|r| Some((r.step as f64, *r.metrics.get(metric)?)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        if pts.is_empty() {
            continue;
        }
        let one = pts.len() == 1;
        let series = chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
        if first {
            series
                .label(format!("allocation {}", s.alloc + 1))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
        }
        if one {
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
    }
    Ok(())
}

/// Each interruption: a vertical line at its step, a triangle at its resume point, and (first
/// panel) its label.
fn draw_marks<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    marks: &[Mark],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
    first: bool,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    for (i, m) in marks.iter().enumerate() {
        let color = match m.kind {
            Interruption::Announced => RGBColor(90, 90, 90),
            Interruption::Unannounced => REDONE,
        };
        let x = m.step as f64;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, y0), (x, y1)],
            color.stroke_width(2),
        )))?;
        if let Some(r) = m.resumed_from {
            let s = chart.draw_series(std::iter::once(TriangleMarker::new(
                (r as f64, y0),
                7,
                BLACK.filled(),
            )))?;
            if first && i == 0 {
                s.label("resume point")
                    .legend(|(x, y)| TriangleMarker::new((x + 9, y), 6, BLACK.filled()));
            }
        }
        if first {
            // Labels alternate between two rows so that close interruptions stay readable.
            let row = y1 - (y1 - y0) * (0.03 + 0.07 * (i % 2) as f64);
            let right = x > (x0 + x1) / 2.0;
            let style = TextStyle::from(("sans-serif", 13).into_font())
                .color(&color)
                .pos(plotters::style::text_anchor::Pos::new(
                    if right {
                        plotters::style::text_anchor::HPos::Right
                    } else {
                        plotters::style::text_anchor::HPos::Left
                    },
                    plotters::style::text_anchor::VPos::Top,
                ));
            let dx = (x1 - x0) * 0.006 * if right { -1.0 } else { 1.0 };
            chart.draw_series(std::iter::once(Text::new(
                mark_label(m),
                (x + dx, row),
                style,
            )))?;
        }
    }
    Ok(())
}

/// `unannounced @ 120 (resumed 100, 20 redone)`.
fn mark_label(m: &Mark) -> String {
    match m.resumed_from {
        Some(r) if r < m.step => format!(
            "{} @ {} (resumed {}, {} redone)",
            kind_label(m.kind),
            m.step,
            r,
            m.step - r
        ),
        Some(r) => format!("{} @ {} (resumed {})", kind_label(m.kind), m.step, r),
        None => format!("{} @ {}", kind_label(m.kind), m.step),
    }
}

/// The loss by step as Unicode block characters, at most `width` wide (each character the mean
/// of its steps; a step logged twice, redone work, counts as logged last). None without losses.
pub fn sparkline(records: &[Record], width: usize) -> Option<String> {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let by_step: BTreeMap<u64, f64> = records
        .iter()
        .filter_map(|r| Some((r.step, *r.metrics.get("loss")?)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    if by_step.is_empty() || width == 0 {
        return None;
    }
    let values: Vec<f64> = by_step.into_values().collect();
    let buckets = values.len().min(width);
    let means: Vec<f64> = (0..buckets)
        .map(|b| {
            let (from, to) = (b * values.len() / buckets, (b + 1) * values.len() / buckets);
            values[from..to].iter().sum::<f64>() / (to - from) as f64
        })
        .collect();
    let (lo, hi) = means
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    Some(
        means
            .iter()
            .map(|v| {
                let x = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
                BARS[((x * 7.0).round() as usize).min(7)]
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(step: u64, loss: f64) -> Record {
        Record {
            step,
            ts: None,
            metrics: [("loss".to_string(), loss)].into_iter().collect(),
        }
    }

    #[test]
    fn the_loss_scaler_s_metrics_are_not_an_eval_metric() {
        let mut records: Vec<Record> = (1..=3).map(|s| rec(s, 1.0)).collect();
        for r in &mut records {
            r.metrics.insert("loss_scale".into(), 65536.0);
            r.metrics.insert("skipped_steps".into(), 0.0);
        }
        assert_eq!(eval_metric(&records), None);
        records[2].metrics.insert("val_loss".into(), 0.5);
        assert_eq!(eval_metric(&records).as_deref(), Some("val_loss"));
    }

    #[test]
    fn sparkline_falls_with_the_loss_and_keeps_to_its_width() {
        let records: Vec<Record> = (1..=100).map(|s| rec(s, 100.0 / s as f64)).collect();
        let line = sparkline(&records, 20).unwrap();
        assert_eq!(line.chars().count(), 20);
        assert!(line.starts_with('█'), "{line}");
        assert!(line.ends_with('▁'), "{line}");
        // Fewer steps than the width: one character a step; flat: mid bars.
        assert_eq!(sparkline(&records[..3], 20).unwrap().chars().count(), 3);
        assert_eq!(sparkline(&[rec(1, 2.0), rec(2, 2.0)], 10).unwrap(), "▅▅");
        assert_eq!(sparkline(&[], 10), None);
        // A redone step counts once, as logged last.
        let line = sparkline(&[rec(1, 1.0), rec(2, 0.0), rec(2, 1.0)], 10).unwrap();
        assert_eq!(line, "▅▅");
    }

    #[test]
    fn an_interrupted_run_draws_one_line_per_allocation_and_its_marks() {
        let mut records: Vec<Record> = (1..=30).map(|s| rec(s, 1.0 / s as f64)).collect();
        // Killed after 30, resumed from 20; eval metric at some steps.
        records.extend((21..=40).map(|s| rec(s, 1.0 / s as f64)));
        for r in records.iter_mut().filter(|r| r.step % 10 == 0) {
            r.metrics.insert("val_loss".into(), 2.0 / r.step as f64);
        }
        let ev = |v| events::Stamped::from_value(v);
        let chain = history::fold(&[
            ev(json!({"event": "allocation_start"})),
            ev(
                json!({"event": "checkpoint_committed", "checkpoint": "step-000000000020",
                      "step": 20, "bytes": 1, "seconds": 0.1}),
            ),
            ev(json!({"event": "allocation_start", "restart_count": 1})),
            ev(
                json!({"event": "checkpoint_loaded", "checkpoint": "step-000000000020", "step": 20}),
            ),
        ]);
        let (svg, p) = render(&records, &chain, true).unwrap().unwrap();
        assert_eq!(
            p,
            Plotted {
                allocations: 2,
                interruptions: 1,
                points: 50,
                eval_metric: Some("val_loss".into())
            }
        );
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.contains("unannounced @ 30 (resumed 20, 10 redone)"));
        // One line per allocation and panel, each in its allocation's colour.
        for c in ["#1F77B4", "#FF7F0E"] {
            let line = format!("stroke=\"{c}\" stroke-width=\"2\"");
            assert_eq!(svg.matches(&line).count(), 2, "{c}");
        }
        assert!(render(&[], &chain, true).is_none());
    }
}
