//! Backtest plots (SVG or PNG) and the panels of the HTML report.
//!
//! Every policy gets panels of its own, so one policy's spikes never hide another's: demand (in
//! replicas, demand ÷ capacity) as an area, ready replicas and replicas as step lines, and each
//! stretch of SLO violation as a red band. The y axis starts at 0, so demand under the floor
//! shows. There are three sections of panels: the whole run, the busiest day (the 24 hours with
//! the most demand, when the run is longer than 36 hours) and the worst violation (the longest
//! stretch of any policy, with the hour around it). The policies of a section share one y range.
//!
//! Drawn with plotters' SVG back end. A PNG is that SVG rasterised with `resvg` (pure Rust),
//! using whatever system fonts are installed (text is left out if there are none, the chart still
//! renders). Long runs are reduced to each pixel column's first, lowest, highest and last point,
//! so spikes of one evaluation survive and the output stays a few hundred KB.

use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One simulated run to draw.
#[derive(Debug, Clone)]
pub struct PlotRun {
    /// Legend label, e.g. the policy name.
    pub label: String,
    /// Replicas after each evaluation (same length as `PlotData::times`).
    pub replicas: Vec<i32>,
    /// Ready replicas at each evaluation.
    pub ready: Vec<i32>,
    /// Each stretch with demand above ready capacity: `[start, end)`.
    pub violations: Vec<(DateTime<Utc>, DateTime<Utc>)>,
}

/// Everything a plot shows.
#[derive(Debug, Clone)]
pub struct PlotData {
    /// Title line (policy and trace names).
    pub title: String,
    /// Second line (the verdict, or the summary figures).
    pub subtitle: String,
    /// Evaluation times.
    pub times: Vec<DateTime<Utc>>,
    /// Demand at each evaluation, `None` where the metric was missing.
    pub demand: Vec<Option<f64>>,
    /// Demand one ready replica absorbs; when set, demand is drawn in replica units
    /// (demand / capacity) in each policy's panel, otherwise in a panel of its own.
    pub capacity: Option<f64>,
    /// The runs (one, or two with `--compare`).
    pub runs: Vec<PlotRun>,
}

/// Plot failures, naming the output file.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The output path's extension is neither `.svg` nor `.png`.
    #[error("{}: unsupported plot format {ext:?}; use a path ending in .svg or .png", .path.display())]
    Extension {
        /// Output file.
        path: PathBuf,
        /// The extension found (empty when there is none).
        ext: String,
    },
    /// There are no evaluation times to draw.
    #[error("{}: nothing to plot: the backtest has no evaluation times", .path.display())]
    NoData {
        /// Output file.
        path: PathBuf,
    },
    /// A series does not have one value per evaluation time.
    #[error("{}: {series} has {found} values but there are {expected} evaluation times", .path.display())]
    Length {
        /// Output file.
        path: PathBuf,
        /// Which series, e.g. ``run `target` replicas``.
        series: String,
        /// Number of values in the series.
        found: usize,
        /// Number of evaluation times.
        expected: usize,
    },
    /// Drawing the chart or rasterising it into a PNG failed.
    #[error("{}: cannot render the plot: {message}", .path.display())]
    Render {
        /// Output file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file could not be written.
    #[error("{}: cannot write plot: {source}", .path.display())]
    Write {
        /// Output file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// Writes the plot; the format follows the extension (`.svg` or `.png`).
pub fn write_plot(data: &PlotData, path: &Path) -> Result<(), PlotError> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let png = match ext.as_str() {
        "svg" => false,
        "png" => true,
        _ => {
            return Err(PlotError::Extension {
                path: path.to_path_buf(),
                ext,
            });
        }
    };
    validate(data, path)?;
    let render_error = |message: String| PlotError::Render {
        path: path.to_path_buf(),
        message,
    };
    let svg = render_svg(data).map_err(render_error)?;
    let bytes = if png {
        render_png(&svg, &font_options()).map_err(render_error)?
    } else {
        svg.into_bytes()
    };
    std::fs::write(path, bytes).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks there is something to draw and that every series matches the times; `path` is the
/// output named in errors.
pub fn validate(data: &PlotData, path: &Path) -> Result<(), PlotError> {
    let expected = data.times.len();
    if expected == 0 {
        return Err(PlotError::NoData {
            path: path.to_path_buf(),
        });
    }
    let mut series: Vec<(String, usize)> = vec![("demand".to_string(), data.demand.len())];
    for run in &data.runs {
        series.push((format!("run `{}` replicas", run.label), run.replicas.len()));
        series.push((format!("run `{}` ready", run.label), run.ready.len()));
    }
    match series.into_iter().find(|(_, found)| *found != expected) {
        Some((series, found)) => Err(PlotError::Length {
            path: path.to_path_buf(),
            series,
            found,
            expected,
        }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Sections and panels

/// A section of panels: one time window, one panel per policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The whole run.
    Overview,
    /// The 24 hours with the most demand.
    BusiestDay,
    /// The longest SLO-violation stretch of any policy, and the time around it.
    WorstViolation,
}

impl Section {
    /// Stable id, used in the report's element ids (`panel-<section>-<n>`).
    pub fn id(self) -> &'static str {
        match self {
            Section::Overview => "overview",
            Section::BusiestDay => "busiest-day",
            Section::WorstViolation => "worst-violation",
        }
    }
}

/// A section's time window.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Which section.
    pub section: Section,
    /// What the window shows, e.g. "busiest day: 2014-04-15 09:00 → 2014-04-16 09:00 UTC".
    pub caption: String,
    /// First evaluation index.
    pub from: usize,
    /// One past the last evaluation index.
    pub to: usize,
}

/// One chart: a policy's run (or demand alone, without a capacity) over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Unique id, `panel-<section>-<n>`.
    pub id: String,
    /// The panel's heading.
    pub title: String,
    /// The window.
    pub window: Window,
    /// The run drawn; `None` for the demand panel of a run without a capacity.
    pub run: Option<usize>,
    /// The top of the y axis (shared by the section's policy panels).
    pub y_max: f64,
}

const DAY: TimeDelta = TimeDelta::hours(24);

/// The sections this data has: always the whole run; the busiest day when the run spans more
/// than 36 hours; the worst violation when some policy had one.
pub fn windows(data: &PlotData) -> Vec<Window> {
    let n = data.times.len();
    let fmt = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M").to_string();
    let mut out = Vec::new();
    if n == 0 {
        return out;
    }
    out.push(Window {
        section: Section::Overview,
        caption: format!(
            "whole run: {} → {} UTC",
            fmt(data.times[0]),
            fmt(data.times[n - 1])
        ),
        from: 0,
        to: n,
    });
    if data.times[n - 1] - data.times[0] > TimeDelta::hours(36) {
        let (from, to) = busiest_day(&data.times, &data.demand);
        out.push(Window {
            section: Section::BusiestDay,
            caption: format!(
                "busiest day (most demand in 24 h): {} → {} UTC",
                fmt(data.times[from]),
                fmt(data.times[to - 1])
            ),
            from,
            to,
        });
    }
    let worst = data
        .runs
        .iter()
        .flat_map(|r| r.violations.iter().map(move |v| (v, &r.label)))
        .max_by_key(|((start, end), _)| (*end - *start, std::cmp::Reverse(*start)));
    if let Some(((start, end), label)) = worst {
        let pad = (*end - *start).max(TimeDelta::hours(1));
        let from = data.times.partition_point(|t| *t < *start - pad);
        let to = data
            .times
            .partition_point(|t| *t <= *end + pad)
            .max(from + 1);
        out.push(Window {
            section: Section::WorstViolation,
            caption: format!(
                "worst violation ({label}, {:.2} min): {} → {} UTC, with {} min either side",
                (*end - *start).num_seconds() as f64 / 60.0,
                fmt(*start),
                fmt(*end),
                pad.num_minutes()
            ),
            from,
            to,
        });
    }
    out
}

/// The 24-hour window (as evaluation indices `[from, to)`) with the largest sum of demand.
fn busiest_day(times: &[DateTime<Utc>], demand: &[Option<f64>]) -> (usize, usize) {
    let (mut best, mut best_sum) = ((0, times.len()), f64::MIN);
    let mut sum = 0.0;
    let mut to = 0;
    for from in 0..times.len() {
        while to < times.len() && times[to] < times[from] + DAY {
            sum += demand[to].unwrap_or(0.0);
            to += 1;
        }
        if sum > best_sum {
            (best, best_sum) = ((from, to), sum);
        }
        sum -= demand[from].unwrap_or(0.0);
    }
    best
}

/// Every panel, section by section: without a capacity a demand panel first, then one panel
/// per policy.
pub fn panels(data: &PlotData) -> Vec<Panel> {
    let mut out = Vec::new();
    for window in windows(data) {
        let range = window.from..window.to;
        let demand_max = data.demand[range.clone()]
            .iter()
            .flatten()
            .fold(0.0f64, |m, d| m.max(*d));
        let replicas_max = data
            .runs
            .iter()
            .flat_map(|r| {
                r.replicas[range.clone()]
                    .iter()
                    .chain(&r.ready[range.clone()])
            })
            .fold(0, |m, r| m.max(*r));
        let units = data.capacity.map_or(0.0, |c| demand_max / c);
        let y_max = (f64::from(replicas_max).max(units) * 1.1).max(1.0);
        let mut add = |run: Option<usize>, name: &str, y_max: f64| {
            out.push(Panel {
                id: format!("panel-{}-{}", window.section.id(), out.len()),
                title: format!("{name} · {}", window.caption),
                window: window.clone(),
                run,
                y_max,
            });
        };
        if data.capacity.is_none() {
            add(None, "demand", (demand_max * 1.1).max(1.0));
        }
        for (i, run) in data.runs.iter().enumerate() {
            add(Some(i), &run.label, y_max);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Drawing

/// Composite plot width in pixels (also the PNG's width).
pub const WIDTH: u32 = 1280;
/// Height of one panel.
pub const PANEL_HEIGHT: u32 = 300;
/// Height of the composite plot's heading.
const HEADING: u32 = 64;

const FONT: &str = "sans-serif";
const TEXT: RGBColor = RGBColor(55, 65, 81);
const GRID: RGBColor = RGBColor(229, 231, 235);
const DEMAND: RGBColor = RGBColor(148, 163, 184);
const READY: RGBColor = RGBColor(17, 24, 39);
const VIOLATION: RGBColor = RGBColor(220, 38, 38);
const RUN_COLOURS: [RGBColor; 4] = [
    RGBColor(29, 78, 216),
    RGBColor(234, 88, 12),
    RGBColor(5, 150, 105),
    RGBColor(147, 51, 234),
];

/// The whole plot as one SVG: a heading, then every panel of [`panels`] one under the other.
pub fn render_svg(data: &PlotData) -> Result<String, String> {
    let panels = panels(data);
    let height = HEADING + PANEL_HEIGHT * panels.len() as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (head, body) = root.split_vertically(HEADING);
        head.draw_text(&data.title, &(FONT, 22).into_font().color(&READY), (16, 10))
            .map_err(|e| e.to_string())?;
        head.draw_text(
            &data.subtitle,
            &(FONT, 15).into_font().color(&TEXT),
            (16, 40),
        )
        .map_err(|e| e.to_string())?;
        for (panel, area) in panels.iter().zip(body.split_evenly((panels.len(), 1))) {
            draw_panel(&area, data, panel)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// One panel as an SVG of its own (the report's figures).
pub fn panel_svg(data: &PlotData, panel: &Panel, width: u32) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, PANEL_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw_panel(&root, data, panel)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    data: &PlotData,
    panel: &Panel,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let w = &panel.window;
    let t0 = data.times[w.from];
    let mut t1 = data.times[w.to - 1];
    if t1 <= t0 {
        t1 = t0 + TimeDelta::minutes(1);
    }
    let span = t1 - t0;
    // The title and the legend sit above the chart, so the legend never covers data.
    let (head, body) = area.split_vertically(PANEL_HEAD);
    let mut chart = ChartBuilder::on(&body)
        .margin_left(10)
        .margin_right(10)
        .margin_bottom(6)
        .margin_top(4)
        .x_label_area_size(26)
        .y_label_area_size(48)
        .build_cartesian_2d(t0..t1, 0.0..panel.y_max)
        .map_err(e)?;
    // Over days, midnight shows the date and other ticks the time of day.
    let long = span > TimeDelta::hours(48);
    let label = |t: &DateTime<Utc>| {
        let midnight = t.time() == chrono::NaiveTime::MIN;
        match (long, midnight) {
            (true, true) => t.format("%m-%d").to_string(),
            (true, false) => t.format("%H:%M").to_string(),
            (false, _) => t.format("%m-%d %H:%M").to_string(),
        }
    };
    let whole = panel.y_max >= 5.0;
    let y_label = |v: &f64| {
        if whole {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .bold_line_style(GRID)
        .x_labels(16)
        .y_labels(6)
        .x_label_formatter(&label)
        .y_label_formatter(&y_label)
        .y_desc(if panel.run.is_some() {
            "replicas"
        } else {
            "demand"
        })
        .label_style((FONT, 12).into_font().color(&TEXT))
        .draw()
        .map_err(e)?;
    let columns = body.dim_in_pixel().0.max(1) as usize;
    // Where a pixel column would hold many evaluations (the whole run of a long replay), the
    // series are drawn per bin of a few columns: the mean as a line and the range as a band,
    // instead of a step line that swings across the band in every column (a barcode).
    let bins = dense_bins(w.to - w.from, columns);
    let per_bin = bins.map(|b| bin_label(span / i32::try_from(b).unwrap_or(i32::MAX)));
    let mut legend = Vec::new();

    let Some(run_index) = panel.run else {
        // Demand alone, on its own axis (no capacity to turn it into replicas).
        legend.push(draw_demand(&mut chart, data, w, columns, bins, 1.0)?);
        return draw_head(&head, &panel.title, &legend);
    };
    let run = &data.runs[run_index];
    let colour = RUN_COLOURS[run_index % RUN_COLOURS.len()];

    // SLO violations: a red band each, at least two pixel columns wide so a minute shows in two
    // weeks.
    let least = span / (columns as i32).max(1) * 2;
    let bands: Vec<_> = run
        .violations
        .iter()
        .filter(|(s, e)| *e >= t0 && *s <= t1)
        .map(|(s, e)| {
            let start = (*s).max(t0);
            let end = (*e).max(start + least).min(t1);
            Rectangle::new(
                [(start, panel.y_max), (end, 0.0)],
                VIOLATION.mix(0.22).filled(),
            )
        })
        .collect();
    if !bands.is_empty() {
        chart.draw_series(bands).map_err(e)?;
        legend.push((
            Swatch::Band(VIOLATION.mix(0.35)),
            "demand above ready capacity".to_string(),
        ));
    }
    if let Some(c) = data.capacity {
        legend.push(draw_demand(&mut chart, data, w, columns, bins, 1.0 / c)?);
    }
    match (bins, per_bin) {
        (Some(bins), Some(per_bin)) => {
            // Ready replicas follow replicas within a pod start-up, which no bin this wide
            // shows apart: the replicas alone, as their range and mean.
            let binned = bin_stats(&data.times, w.from, w.to, bins, |i| {
                Some(f64::from(run.replicas[i]))
            });
            chart
                .draw_series(binned.iter().map(|b| {
                    Rectangle::new([(b.start, b.max), (b.end, b.min)], colour.mix(0.2).filled())
                }))
                .map_err(e)?;
            legend.push((
                Swatch::Band(colour.mix(0.3)),
                format!("replicas, range per {per_bin}"),
            ));
            let mean = steps(vec![binned.iter().map(|b| (b.start, b.mean)).collect()]);
            chart
                .draw_series(
                    mean.into_iter()
                        .map(|s| PathElement::new(s, colour.stroke_width(2))),
                )
                .map_err(e)?;
            legend.push((
                Swatch::Line(colour, 2),
                format!("replicas, mean per {per_bin} ({})", run.label),
            ));
        }
        _ => {
            let lines = [
                (&run.ready, READY, 1, "ready replicas".to_string()),
                (
                    &run.replicas,
                    colour,
                    2,
                    format!("replicas ({})", run.label),
                ),
            ];
            for (values, colour, width, label) in lines {
                let segments = steps(reduce(&data.times, w.from, w.to, columns, |i| {
                    Some(f64::from(values[i]))
                }));
                chart
                    .draw_series(
                        segments
                            .into_iter()
                            .map(|s| PathElement::new(s, colour.stroke_width(width))),
                    )
                    .map_err(e)?;
                legend.push((Swatch::Line(colour, width), label));
            }
        }
    }
    draw_head(&head, &panel.title, &legend)
}

/// Height of a panel's heading: its title, then its legend.
const PANEL_HEAD: u32 = 46;

/// How a legend entry is drawn.
#[derive(Debug, Clone, Copy)]
enum Swatch {
    /// A filled square (an area or a band).
    Band(RGBAColor),
    /// A line of this width.
    Line(RGBColor, u32),
}

/// A panel's heading: the title on the first line, the legend's entries side by side on the
/// second.
fn draw_head<DB: DrawingBackend>(
    head: &DrawingArea<DB, Shift>,
    title: &str,
    legend: &[(Swatch, String)],
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    head.draw_text(title, &(FONT, 15).into_font().color(&READY), (58, 6))
        .map_err(e)?;
    let font = (FONT, 12).into_font().color(&TEXT);
    let (mut x, y) = (58i32, 32i32);
    for (swatch, label) in legend {
        match *swatch {
            Swatch::Band(c) => head
                .draw(&Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()))
                .map_err(e)?,
            Swatch::Line(c, width) => head
                .draw(&PathElement::new(
                    [(x, y), (x + 14, y)],
                    c.stroke_width(width),
                ))
                .map_err(e)?,
        }
        head.draw_text(label, &font, (x + 20, y - 7)).map_err(e)?;
        // The text's width as the back end measures it (a per-character guess without fonts).
        let width = head
            .estimate_text_size(label, &font)
            .map_or(label.chars().count() as u32 * 7, |(w, _)| w);
        x += 20 + i32::try_from(width).unwrap_or(0) + 22;
    }
    Ok(())
}

/// The number of bins to draw `points` evaluations in over `columns` pixel columns: `None` when
/// a column holds few enough evaluations to draw each one's step, otherwise one bin per
/// [`BIN_COLUMNS`] columns.
fn dense_bins(points: usize, columns: usize) -> Option<usize> {
    (points > DENSE_PER_COLUMN * columns.max(1)).then(|| (columns / BIN_COLUMNS).max(1))
}

/// More evaluations than this per pixel column draw as bins (see [`dense_bins`]).
const DENSE_PER_COLUMN: usize = 8;
/// Pixel columns per bin.
const BIN_COLUMNS: usize = 4;

/// A bin's width in words: `67 min`, `2.5 h`.
fn bin_label(width: TimeDelta) -> String {
    let minutes = width.num_seconds() as f64 / 60.0;
    if minutes < 90.0 {
        format!("{minutes:.0} min")
    } else {
        format!("{:.1} h", minutes / 60.0)
    }
}

/// One bin of [`bin_stats`]: its time span and the lowest, mean and highest value in it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bin {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    min: f64,
    mean: f64,
    max: f64,
}

/// The evaluations `[from, to)` in `bins` equal spans of time, each with the lowest, mean and
/// highest of `value` (evaluations without a value left out; a bin without any is left out).
fn bin_stats(
    times: &[DateTime<Utc>],
    from: usize,
    to: usize,
    bins: usize,
    value: impl Fn(usize) -> Option<f64>,
) -> Vec<Bin> {
    let (Some(&t0), Some(&t1)) = (times.get(from), times.get(to.saturating_sub(1))) else {
        return Vec::new();
    };
    let bins = i32::try_from(bins.max(1)).unwrap_or(i32::MAX);
    let width = ((t1 - t0) / bins).max(TimeDelta::milliseconds(1));
    let mut out: Vec<Bin> = Vec::new();
    let mut count = 0usize;
    for (i, time) in times.iter().enumerate().take(to).skip(from) {
        let Some(v) = value(i).filter(|v| v.is_finite()) else {
            continue;
        };
        let k =
            ((*time - t0).num_milliseconds() / width.num_milliseconds()).min(i64::from(bins) - 1);
        let start = t0 + width * i32::try_from(k).unwrap_or(0);
        match out.last_mut() {
            Some(b) if b.start == start => {
                b.min = b.min.min(v);
                b.max = b.max.max(v);
                b.mean += (v - b.mean) / (count + 1) as f64;
                count += 1;
            }
            _ => {
                out.push(Bin {
                    start,
                    end: start + width,
                    min: v,
                    mean: v,
                    max: v,
                });
                count = 1;
            }
        }
    }
    out
}

type Chart<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<
        plotters::coord::types::RangedDateTime<DateTime<Utc>>,
        plotters::coord::types::RangedCoordf64,
    >,
>;

/// Demand times `factor` as a filled area, one per stretch without gaps; with `bins`, each
/// bin's peak (see [`dense_bins`]). Returns its legend entry.
fn draw_demand<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    data: &PlotData,
    w: &Window,
    columns: usize,
    bins: Option<usize>,
    factor: f64,
) -> Result<(Swatch, String), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let value = |i: usize| data.demand[i].map(|d| d * factor);
    let mut label = if data.capacity.is_some() {
        "demand ÷ capacity".to_string()
    } else {
        "demand".to_string()
    };
    let segments = match bins {
        Some(bins) => {
            let binned = bin_stats(&data.times, w.from, w.to, bins, value);
            if let (Some(first), Some(last)) = (binned.first(), binned.last()) {
                let per_bin = bin_label(first.end - first.start);
                label = format!("{label}, peak per {per_bin}");
                // One area per run of adjacent bins: a bin without demand is a gap.
                let mut runs: Vec<Vec<(DateTime<Utc>, f64)>> = Vec::new();
                let mut previous: Option<&Bin> = None;
                for b in &binned {
                    match (runs.last_mut(), previous) {
                        (Some(run), Some(p)) if p.end == b.start => run.push((b.start, b.max)),
                        (run, p) => {
                            if let (Some(run), Some(p)) = (run, p) {
                                run.push((p.end, p.max));
                            }
                            runs.push(vec![(b.start, b.max)]);
                        }
                    }
                    previous = Some(b);
                }
                if let Some(run) = runs.last_mut() {
                    run.push((last.end.min(data.times[w.to - 1]), last.max));
                }
                steps(runs)
            } else {
                Vec::new()
            }
        }
        None => reduce(&data.times, w.from, w.to, columns, value),
    };
    for segment in segments {
        chart
            .draw_series(AreaSeries::new(segment, 0.0, DEMAND.mix(0.45)).border_style(DEMAND))
            .map_err(e)?;
    }
    Ok((Swatch::Band(DEMAND.mix(0.6)), label))
}

/// The points of `value` over `[from, to)` reduced to `columns` pixel columns: each column keeps
/// its first, lowest, highest and last point, in time order. A missing value ends a segment.
fn reduce(
    times: &[DateTime<Utc>],
    from: usize,
    to: usize,
    columns: usize,
    value: impl Fn(usize) -> Option<f64>,
) -> Vec<Vec<(DateTime<Utc>, f64)>> {
    let n = to.saturating_sub(from);
    let per_column = n.div_ceil(columns.max(1)).max(1);
    let mut segments = Vec::new();
    let mut current: Vec<(DateTime<Utc>, f64)> = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + per_column).min(to);
        // Indices kept in this column, within one gap-free run of values.
        let mut run_start = start;
        while run_start < end {
            if value(run_start).is_none() {
                if !current.is_empty() {
                    segments.push(std::mem::take(&mut current));
                }
                run_start += 1;
                continue;
            }
            let mut run_end = run_start;
            while run_end < end && value(run_end).is_some() {
                run_end += 1;
            }
            let v = |i: usize| value(i).unwrap_or(0.0);
            let lowest = (run_start..run_end)
                .min_by(|a, b| v(*a).total_cmp(&v(*b)))
                .unwrap_or(run_start);
            let highest = (run_start..run_end)
                .max_by(|a, b| v(*a).total_cmp(&v(*b)))
                .unwrap_or(run_start);
            let mut keep = [run_start, lowest, highest, run_end - 1];
            keep.sort_unstable();
            let mut last = None;
            for i in keep {
                if last != Some(i) {
                    current.push((times[i], v(i)));
                    last = Some(i);
                }
            }
            run_start = run_end;
        }
        start = end;
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

/// Segments (from [`reduce`]) drawn as steps: each value holds until the next point's time.
fn steps(segments: Vec<Vec<(DateTime<Utc>, f64)>>) -> Vec<Vec<(DateTime<Utc>, f64)>> {
    segments
        .into_iter()
        .map(|segment| {
            let mut out = Vec::with_capacity(segment.len() * 2);
            for (t, v) in segment {
                if let Some(&(_, previous)) = out.last()
                    && previous != v
                {
                    out.push((t, previous));
                }
                out.push((t, v));
            }
            out
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// PNG

/// The sans-serif fonts tried first, in order.
const PREFERRED_FONTS: [&str; 4] = ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"];

fn font_options() -> resvg::usvg::Options<'static> {
    let mut options = resvg::usvg::Options::default();
    let db = options.fontdb_mut();
    db.load_system_fonts();
    let has = |name: &str| {
        db.faces()
            .any(|face| face.families.iter().any(|(family, _)| family == name))
    };
    let family = PREFERRED_FONTS
        .iter()
        .find(|name| has(name))
        .map(|name| (*name).to_string())
        .or_else(|| {
            db.faces()
                .find_map(|face| face.families.first().map(|(family, _)| family.clone()))
        });
    if let Some(family) = family {
        db.set_sans_serif_family(family.clone());
        options.font_family = family;
    }
    options
}

/// Rasterises the SVG at its own size into PNG bytes.
fn render_png(svg: &str, options: &resvg::usvg::Options<'_>) -> Result<Vec<u8>, String> {
    let tree = resvg::usvg::Tree::from_str(svg, options).map_err(|e| e.to_string())?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| format!("cannot allocate a {}x{} image", size.width(), size.height()))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::identity(),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use resvg::usvg::roxmltree;

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("test time")
            .with_timezone(&Utc)
    }

    /// `n` evaluations a minute apart from 2014-07-01, two runs, a gap in demand, a spike at
    /// `n / 2` and a violation of the second run there.
    fn data(n: usize) -> PlotData {
        let t0 = t("2014-07-01T00:00:00Z");
        let times: Vec<_> = (0..n).map(|i| t0 + TimeDelta::minutes(i as i64)).collect();
        let demand = (0..n)
            .map(|i| {
                (!(20..23).contains(&i)).then(|| {
                    if i == n / 2 {
                        4000.0
                    } else {
                        300.0 + 200.0 * ((i as f64) / 90.0).sin()
                    }
                })
            })
            .collect();
        let replicas: Vec<i32> = (0..n).map(|i| 3 + (i % 120 / 40) as i32).collect();
        let ready: Vec<i32> = (0..n).map(|i| replicas[i.saturating_sub(1)]).collect();
        PlotData {
            title: "policy <web> & \"friends\"".to_string(),
            subtitle: "web: −10 % replica-hours vs hpa".to_string(),
            times: times.clone(),
            demand,
            capacity: Some(100.0),
            runs: vec![
                PlotRun {
                    label: "web".to_string(),
                    replicas: replicas.clone(),
                    ready: ready.clone(),
                    violations: Vec::new(),
                },
                PlotRun {
                    label: "hpa".to_string(),
                    replicas: replicas.iter().map(|r| r + 1).collect(),
                    ready: ready.iter().map(|r| r + 1).collect(),
                    violations: vec![(times[n / 2], times[n / 2] + TimeDelta::minutes(3))],
                },
            ],
        }
    }

    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect()
    }

    #[test]
    fn every_policy_gets_a_panel_in_every_section() {
        let d = data(3 * 24 * 60);
        let p = panels(&d);
        let sections: Vec<_> = p.iter().map(|p| (p.window.section, p.run)).collect();
        assert_eq!(
            sections,
            [
                (Section::Overview, Some(0)),
                (Section::Overview, Some(1)),
                (Section::BusiestDay, Some(0)),
                (Section::BusiestDay, Some(1)),
                (Section::WorstViolation, Some(0)),
                (Section::WorstViolation, Some(1)),
            ]
        );
        let ids: std::collections::BTreeSet<_> = p.iter().map(|p| p.id.clone()).collect();
        assert_eq!(ids.len(), p.len(), "ids are unique");
        // The worst violation's window holds the violation and an hour either side.
        let w = &p[4].window;
        assert!(d.times[w.from] <= d.runs[1].violations[0].0 - TimeDelta::minutes(59));
        assert!(d.times[w.to - 1] >= d.runs[1].violations[0].1 + TimeDelta::minutes(59));
        // One y range per section, above every replica count and the demand in replicas.
        assert_eq!(p[0].y_max, p[1].y_max);
        assert!(
            p[0].y_max >= 40.0,
            "the 4000 spike is 40 replicas: {}",
            p[0].y_max
        );
    }

    #[test]
    fn the_busiest_day_is_the_24_hours_with_most_demand() {
        let t0 = t("2014-07-01T00:00:00Z");
        let times: Vec<_> = (0..72).map(|h| t0 + TimeDelta::hours(h)).collect();
        // Demand 1, except 10 from hour 30 to hour 41.
        let demand: Vec<_> = (0..72)
            .map(|h| Some(if (30..42).contains(&h) { 10.0 } else { 1.0 }))
            .collect();
        let (from, to) = busiest_day(&times, &demand);
        assert_eq!(to - from, 24);
        assert!(from <= 30 && to >= 42, "{from}..{to}");
    }

    #[test]
    fn without_capacity_demand_has_its_own_panel_and_no_violation_section() {
        let mut d = data(600);
        d.capacity = None;
        d.runs[1].violations.clear();
        let p = panels(&d);
        assert_eq!(
            p.iter().map(|p| p.run).collect::<Vec<_>>(),
            [None, Some(0), Some(1)]
        );
        let svg = render_svg(&d).expect("svg");
        assert!(
            texts(&svg).iter().any(|t| t == "demand"),
            "{:?}",
            texts(&svg)
        );
    }

    #[test]
    fn svg_is_well_formed_with_titles_legends_and_escaped_text() {
        let d = data(3 * 24 * 60);
        let svg = render_svg(&d).expect("svg");
        let texts = texts(&svg);
        assert!(
            texts.contains(&"policy <web> & \"friends\"".to_string()),
            "{texts:?}"
        );
        for label in [
            "replicas (web)",
            "replicas (hpa)",
            "ready replicas",
            "demand ÷ capacity",
            "demand above ready capacity",
        ] {
            assert!(texts.iter().any(|t| t == label), "no {label:?}: {texts:?}");
        }
        assert!(
            texts.iter().any(|t| t.starts_with("web · busiest day")),
            "{texts:?}"
        );
        assert!(
            texts
                .iter()
                .any(|t| t.starts_with("hpa · worst violation (hpa, 3.00 min)"))
        );
    }

    #[test]
    fn two_weeks_stay_small_and_keep_a_one_minute_spike() {
        let d = data(14 * 24 * 60);
        let svg = render_svg(&d).expect("svg");
        assert!(svg.len() < 1_500_000, "{} bytes", svg.len());
        // The reduced demand keeps the spike of one evaluation.
        let seg = reduce(&d.times, 0, d.times.len(), 1000, |i| d.demand[i]);
        assert!(seg.iter().flatten().any(|(_, v)| *v == 4000.0));
        assert!(seg.iter().map(Vec::len).sum::<usize>() <= 4 * 1000 + 8);
    }

    #[test]
    fn a_long_run_is_drawn_per_bin_with_its_range_mean_and_peak() {
        // Two weeks a minute apart on 1,280 pixels: many evaluations per column, in bins of 4.
        let d = data(14 * 24 * 60);
        let texts = texts(&render_svg(&d).expect("svg"));
        for label in [
            "replicas, mean per 63 min (web)",
            "replicas, range per 63 min",
            "demand ÷ capacity, peak per 63 min",
        ] {
            assert!(texts.iter().any(|t| t == label), "no {label:?}: {texts:?}");
        }
        // The busiest day is drawn evaluation by evaluation.
        assert!(texts.iter().any(|t| t == "ready replicas"), "{texts:?}");
        assert_eq!(dense_bins(4 * 24 * 60, 1212), None);
        assert_eq!(dense_bins(14 * 24 * 60, 1212), Some(303));
        // Each bin: its lowest, mean and highest value; a bin without values is left out.
        let times: Vec<_> = (0..8)
            .map(|i| t("2014-07-01T00:00:00Z") + TimeDelta::minutes(i))
            .collect();
        let values = [1.0, 3.0, 2.0, 6.0, f64::NAN, f64::NAN, 5.0, 5.0];
        let bins = bin_stats(&times, 0, 8, 3, |i| Some(values[i]));
        let stats: Vec<_> = bins.iter().map(|b| (b.min, b.mean, b.max)).collect();
        assert_eq!(stats, [(1.0, 2.0, 3.0), (6.0, 6.0, 6.0), (5.0, 5.0, 5.0)]);
        assert_eq!(bins[0].end, bins[1].start);
        assert_eq!(bin_label(TimeDelta::minutes(67)), "67 min");
        assert_eq!(bin_label(TimeDelta::minutes(150)), "2.5 h");
    }

    #[test]
    fn gaps_break_the_demand_and_steps_hold_until_the_next_point() {
        let d = data(60);
        let seg = reduce(&d.times, 0, 60, 1000, |i| d.demand[i]);
        assert_eq!(seg.len(), 2, "the gap at 20..23 splits the area");
        let s = steps(reduce(&d.times, 0, 3, 1000, |i| Some([1.0, 1.0, 3.0][i])));
        assert_eq!(
            s[0].iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            [1.0, 1.0, 1.0, 3.0]
        );
        assert_eq!(s[0][2].0, d.times[2]);
    }

    #[test]
    fn png_has_signature_and_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.png");
        write_plot(&data(600), &path).expect("png");
        let bytes = std::fs::read(&path).expect("read");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        // IHDR: width then height, big-endian, at bytes 16..24.
        let width = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let height = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        // 10 hours: the whole run and the worst violation, one panel per policy each.
        assert_eq!((width, height), (WIDTH, HEADING + 4 * PANEL_HEIGHT));
    }

    #[test]
    fn png_renders_without_any_font() {
        let svg = render_svg(&data(120)).expect("svg");
        let png = render_png(&svg, &resvg::usvg::Options::default()).expect("png");
        assert!(png.starts_with(b"\x89PNG"));
    }

    #[test]
    fn unsupported_extension_names_it() {
        let d = data(10);
        for name in ["plot.jpg", "plot"] {
            let path = PathBuf::from(name);
            let err = write_plot(&d, &path).expect_err("refused");
            assert!(matches!(err, PlotError::Extension { .. }), "{err}");
            assert!(err.to_string().contains(".svg or .png"), "{err}");
        }
        let err = write_plot(&d, Path::new("plot.jpg")).expect_err("refused");
        assert!(err.to_string().contains("\"jpg\""), "{err}");
    }

    #[test]
    fn write_failure_names_the_path() {
        let path = PathBuf::from("/nonexistent-dir/plot.svg");
        let err = write_plot(&data(10), &path).expect_err("refused");
        assert!(matches!(err, PlotError::Write { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn mismatched_or_empty_series_are_rejected() {
        let mut d = data(10);
        d.runs[1].ready.pop();
        let err = write_plot(&d, Path::new("x.svg")).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "x.svg: run `hpa` ready has 9 values but there are 10 evaluation times"
        );
        let mut d = data(10);
        d.times.clear();
        let err = write_plot(&d, Path::new("x.svg")).expect_err("refused");
        assert!(matches!(err, PlotError::NoData { .. }), "{err}");
    }

    #[test]
    fn single_evaluation_still_plots() {
        let mut d = data(1);
        d.runs.iter_mut().for_each(|r| r.violations.clear());
        let svg = render_svg(&d).expect("svg");
        assert!(roxmltree::Document::parse(&svg).is_ok());
    }
}
