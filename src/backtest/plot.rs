//! Backtest plots (SVG or PNG).
//!
//! The SVG is written by hand; a PNG is that same SVG rasterised with `resvg` (pure Rust), using
//! whatever system fonts are installed (text is left out if there are none, the chart still renders).
//!
//! Long runs are downsampled to the plot's pixel width while keeping extremes: demand keeps the
//! lowest and highest sample of each pixel column (the area follows the highest, a darker band
//! spans both); step lines keep every change in a column with at most two changes, otherwise a
//! vertical stroke over the column's range. Output stays a few hundred KB at most.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};

/// One simulated run to draw.
#[derive(Debug, Clone)]
pub struct PlotRun {
    /// Legend label, e.g. the policy name.
    pub label: String,
    /// Replicas after each evaluation (same length as `PlotData::times`).
    pub replicas: Vec<i32>,
    /// Ready replicas at each evaluation.
    pub ready: Vec<i32>,
}

/// Everything a plot shows.
#[derive(Debug, Clone)]
pub struct PlotData {
    /// Title line (policy and trace names).
    pub title: String,
    /// Second line (summary figures).
    pub subtitle: String,
    /// Evaluation times.
    pub times: Vec<DateTime<Utc>>,
    /// Demand at each evaluation, `None` where the metric was missing.
    pub demand: Vec<Option<f64>>,
    /// Demand one ready replica absorbs; when set, demand is drawn in replica units
    /// (demand / capacity) on the same axis as replicas, otherwise on its own axis.
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
    /// Rasterising the SVG into a PNG failed.
    #[error("{}: cannot render PNG: {message}", .path.display())]
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
    let svg = render_svg(data).map_err(|e| render_error(e.to_string()))?;
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

/// Checks there is something to draw and that every series matches the times.
fn validate(data: &PlotData, path: &Path) -> Result<(), PlotError> {
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
// Layout and style

/// Canvas width in pixels (also the PNG's width).
const WIDTH: f64 = 1280.0;
/// Canvas height in pixels (also the PNG's height).
const HEIGHT: f64 = 640.0;
/// Left edge of the plot area.
const PLOT_LEFT: f64 = 76.0;
/// Top edge of the plot area.
const PLOT_TOP: f64 = 96.0;
/// Bottom edge of the plot area.
const PLOT_BOTTOM: f64 = HEIGHT - 104.0;
/// Right margin with and without a right-hand demand axis.
const RIGHT_MARGIN_AXIS: f64 = 84.0;
const RIGHT_MARGIN_PLAIN: f64 = 36.0;

const FONT: &str = "DejaVu Sans, Liberation Sans, Arial, Helvetica, sans-serif";
/// Fonts tried, in order, for `sans-serif` when rasterising.
const PREFERRED_FONTS: [&str; 5] = [
    "DejaVu Sans",
    "Liberation Sans",
    "Noto Sans",
    "Arial",
    "Helvetica",
];
const TEXT: &str = "#374151";
const TEXT_STRONG: &str = "#111827";
const TEXT_MUTED: &str = "#6b7280";
const GRID: &str = "#e5e7eb";
const AXIS: &str = "#9ca3af";
const DEMAND_FILL: &str = "#d3dce7";
const DEMAND_BAND: &str = "#b9c6d6";
const DEMAND_LINE: &str = "#94a3b8";
/// One colour per run; a third run and beyond reuse them.
const RUN_COLOURS: [&str; 4] = ["#1d4ed8", "#ea580c", "#059669", "#9333ea"];

/// A linear map from data values to pixel rows.
#[derive(Debug, Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
}

impl Scale {
    fn y(self, v: f64) -> f64 {
        PLOT_BOTTOM - (v - self.lo) / (self.hi - self.lo) * (PLOT_BOTTOM - PLOT_TOP)
    }
}

/// Maps times to pixel columns and x positions.
#[derive(Debug, Clone, Copy)]
struct TimeAxis {
    t0: DateTime<Utc>,
    t1: DateTime<Utc>,
    right: f64,
}

impl TimeAxis {
    fn span_ms(self) -> f64 {
        (self.t1 - self.t0).num_milliseconds() as f64
    }

    fn x(self, t: DateTime<Utc>) -> f64 {
        let frac = (t - self.t0).num_milliseconds() as f64 / self.span_ms();
        PLOT_LEFT + frac.clamp(0.0, 1.0) * (self.right - PLOT_LEFT)
    }

    /// The pixel column an x position falls in.
    fn column(x: f64) -> i64 {
        (x - PLOT_LEFT).floor() as i64
    }
}

// ---------------------------------------------------------------------------------------------
// SVG

/// Builds the whole SVG document. `data` must have passed [`validate`].
fn render_svg(data: &PlotData) -> Result<String, fmt::Error> {
    let capacity = data.capacity.filter(|c| c.is_finite() && *c > 0.0);
    let demand: Vec<Option<f64>> = data
        .demand
        .iter()
        .map(|d| {
            d.filter(|v| v.is_finite())
                .map(|v| capacity.map_or(v, |c| v / c))
        })
        .collect();
    let demand_range = demand
        .iter()
        .flatten()
        .fold(None, |acc: Option<(f64, f64)>, &v| {
            Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
        });

    let right_axis = capacity.is_none();
    let right = WIDTH
        - if right_axis {
            RIGHT_MARGIN_AXIS
        } else {
            RIGHT_MARGIN_PLAIN
        };
    let (first, last) = data
        .times
        .iter()
        .fold((data.times[0], data.times[0]), |(lo, hi), &t| {
            (lo.min(t), hi.max(t))
        });
    // A single evaluation (or a sub-second run) gets an hour around it.
    let (t0, t1) = if last - first < Duration::seconds(1) {
        (first - Duration::minutes(30), first + Duration::minutes(30))
    } else {
        (first, last)
    };
    let time = TimeAxis { t0, t1, right };

    // Left axis: replicas (and demand in replica units when the capacity is known).
    let (min_replicas, max_replicas) = data
        .runs
        .iter()
        .flat_map(|r| r.replicas.iter().chain(&r.ready))
        .fold((0, 0), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (mut left_lo, mut left_hi) = (f64::from(min_replicas), f64::from(max_replicas));
    if let (false, Some((lo, hi))) = (right_axis, demand_range) {
        left_lo = left_lo.min(lo);
        left_hi = left_hi.max(hi);
    }
    let left_ticks = nice_ticks(left_lo, left_hi.max(1.0), true);
    let left = left_ticks.scale;
    let right_ticks = match (right_axis, demand_range) {
        (true, Some((lo, hi))) => Some(nice_ticks(lo.min(0.0), hi, false)),
        (true, None) => Some(nice_ticks(0.0, 1.0, false)),
        _ => None,
    };
    let demand_scale = right_ticks.as_ref().map_or(left, |t| t.scale);

    let mut s = String::with_capacity(64 * 1024);
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="{FONT}">"#,
        w = WIDTH,
        h = HEIGHT
    )?;
    writeln!(
        s,
        r#"<defs><clipPath id="plot-area"><rect x="{x}" y="{y}" width="{w}" height="{h}"/></clipPath></defs>"#,
        x = PLOT_LEFT,
        y = PLOT_TOP - 2.0,
        w = right - PLOT_LEFT,
        h = PLOT_BOTTOM - PLOT_TOP + 2.0
    )?;
    writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##)?;

    // Title and subtitle.
    writeln!(
        s,
        r#"<text x="{PLOT_LEFT}" y="34" font-size="19" font-weight="bold" fill="{TEXT_STRONG}">{}</text>"#,
        escape(&data.title)
    )?;
    writeln!(
        s,
        r#"<text x="{PLOT_LEFT}" y="60" font-size="13" fill="{TEXT_MUTED}">{}</text>"#,
        escape(&data.subtitle)
    )?;

    // Grid, axes and tick labels.
    writeln!(s, r#"<g stroke="{GRID}" stroke-width="1">"#)?;
    for &v in &left_ticks.values {
        let y = left.y(v);
        writeln!(
            s,
            r#"<line x1="{PLOT_LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}"/>"#
        )?;
    }
    let ticks = time_ticks(
        t0,
        t1,
        ((right - PLOT_LEFT) / 105.0).floor().max(2.0) as i64,
    );
    for (t, _) in &ticks {
        let x = time.x(*t);
        writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{PLOT_TOP}" x2="{x:.1}" y2="{PLOT_BOTTOM}"/>"#
        )?;
    }
    writeln!(s, "</g>")?;

    writeln!(s, r#"<g font-size="12" fill="{TEXT}" text-anchor="end">"#)?;
    for &v in &left_ticks.values {
        writeln!(
            s,
            r#"<text x="{x}" y="{y:.1}">{}</text>"#,
            format_number(v, left_ticks.step),
            x = PLOT_LEFT - 8.0,
            y = left.y(v) + 4.0
        )?;
    }
    writeln!(s, "</g>")?;
    writeln!(
        s,
        r#"<text transform="translate(22 {y:.1}) rotate(-90)" font-size="13" fill="{TEXT}" text-anchor="middle">replicas</text>"#,
        y = (PLOT_TOP + PLOT_BOTTOM) / 2.0
    )?;
    if let Some(rt) = &right_ticks {
        writeln!(s, r#"<g font-size="12" fill="{TEXT}" text-anchor="start">"#)?;
        for &v in &rt.values {
            let y = rt.scale.y(v);
            writeln!(
                s,
                r#"<line x1="{right}" y1="{y:.1}" x2="{x2}" y2="{y:.1}" stroke="{AXIS}"/><text x="{x}" y="{ty:.1}">{}</text>"#,
                format_number(v, rt.step),
                x2 = right + 5.0,
                x = right + 8.0,
                ty = y + 4.0
            )?;
        }
        writeln!(s, "</g>")?;
        writeln!(
            s,
            r#"<text transform="translate({x} {y:.1}) rotate(90)" font-size="13" fill="{TEXT}" text-anchor="middle">demand</text>"#,
            x = WIDTH - 18.0,
            y = (PLOT_TOP + PLOT_BOTTOM) / 2.0
        )?;
    }
    writeln!(
        s,
        r#"<g font-size="12" fill="{TEXT}" text-anchor="middle">"#
    )?;
    for (t, label) in &ticks {
        let x = time.x(*t);
        writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{PLOT_BOTTOM}" x2="{x:.1}" y2="{y2}" stroke="{AXIS}"/><text x="{x:.1}" y="{y}">{}</text>"#,
            escape(label),
            y2 = PLOT_BOTTOM + 5.0,
            y = PLOT_BOTTOM + 20.0
        )?;
    }
    writeln!(s, "</g>")?;
    writeln!(
        s,
        r#"<text x="{x:.1}" y="{y}" font-size="12" fill="{TEXT_MUTED}" text-anchor="middle">{} – {} (UTC)</text>"#,
        first.format("%Y-%m-%d %H:%M"),
        last.format("%Y-%m-%d %H:%M"),
        x = (PLOT_LEFT + right) / 2.0,
        y = PLOT_BOTTOM + 42.0
    )?;

    // Data, clipped to the plot area.
    writeln!(s, r#"<g clip-path="url(#plot-area)" fill="none">"#)?;
    let demand_paths = demand_paths(&data.times, &demand, time, demand_scale)?;
    if !demand_paths.area.is_empty() {
        writeln!(
            s,
            r#"<path d="{}" fill="{DEMAND_FILL}" stroke="none"/>"#,
            demand_paths.area
        )?;
        writeln!(
            s,
            r#"<path d="{}" fill="{DEMAND_BAND}" stroke="none"/>"#,
            demand_paths.band
        )?;
        writeln!(
            s,
            r#"<path d="{}" stroke="{DEMAND_LINE}" stroke-width="1" stroke-linejoin="round"/>"#,
            demand_paths.outline
        )?;
    }
    // Dense runs (several evaluations a pixel) get thinner lines so demand shows through.
    let styles = LineStyles::for_density(data.times.len() as f64 / (right - PLOT_LEFT));
    for (i, run) in data.runs.iter().enumerate() {
        let colour = RUN_COLOURS[i % RUN_COLOURS.len()];
        writeln!(
            s,
            r#"<path d="{}" stroke="{colour}"{}/>"#,
            step_path(&data.times, &run.ready, time, left)?,
            styles.ready
        )?;
        writeln!(
            s,
            r#"<path d="{}" stroke="{colour}" stroke-linejoin="round"{}/>"#,
            step_path(&data.times, &run.replicas, time, left)?,
            styles.replicas
        )?;
    }
    writeln!(s, "</g>")?;
    writeln!(
        s,
        r#"<rect x="{PLOT_LEFT}" y="{PLOT_TOP}" width="{w}" height="{h}" fill="none" stroke="{AXIS}"/>"#,
        w = right - PLOT_LEFT,
        h = PLOT_BOTTOM - PLOT_TOP
    )?;

    write_legend(&mut s, data, capacity, styles)?;
    writeln!(s, "</svg>")?;
    Ok(s)
}

/// How a step line is stroked.
#[derive(Debug, Clone, Copy)]
struct LineStyle {
    width: f64,
    dash: Option<&'static str>,
    opacity: f64,
}

impl fmt::Display for LineStyle {
    /// The stroke attributes, each with a leading space.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, r#" stroke-width="{}""#, self.width)?;
        if let Some(dash) = self.dash {
            write!(f, r#" stroke-dasharray="{dash}""#)?;
        }
        if self.opacity < 1.0 {
            write!(f, r#" stroke-opacity="{}""#, self.opacity)?;
        }
        Ok(())
    }
}

/// The styles of a run's two lines.
#[derive(Debug, Clone, Copy)]
struct LineStyles {
    replicas: LineStyle,
    ready: LineStyle,
}

impl LineStyles {
    /// Bold replicas and dashed ready lines, thinned when there are several evaluations a pixel
    /// (dashes would only add noise there).
    fn for_density(per_pixel: f64) -> LineStyles {
        if per_pixel > 2.0 {
            LineStyles {
                replicas: LineStyle {
                    width: 1.2,
                    dash: None,
                    opacity: 0.9,
                },
                ready: LineStyle {
                    width: 0.8,
                    dash: None,
                    opacity: 0.5,
                },
            }
        } else {
            LineStyles {
                replicas: LineStyle {
                    width: 2.0,
                    dash: None,
                    opacity: 1.0,
                },
                ready: LineStyle {
                    width: 1.3,
                    dash: Some("5 3"),
                    opacity: 0.85,
                },
            }
        }
    }
}

/// One legend entry: its swatch and label.
enum Swatch {
    Area,
    Line {
        colour: &'static str,
        style: LineStyle,
    },
}

/// Draws the legend as one centred row below the time axis.
fn write_legend(
    s: &mut String,
    data: &PlotData,
    capacity: Option<f64>,
    styles: LineStyles,
) -> fmt::Result {
    let mut items = vec![(
        Swatch::Area,
        match capacity {
            Some(c) => format!("demand ÷ capacity ({} per replica)", format_plain(c)),
            None => "demand (right axis)".to_string(),
        },
    )];
    for (i, run) in data.runs.iter().enumerate() {
        let colour = RUN_COLOURS[i % RUN_COLOURS.len()];
        let prefix = if run.label.is_empty() {
            String::new()
        } else {
            format!("{}: ", run.label)
        };
        items.push((
            Swatch::Line {
                colour,
                style: styles.replicas,
            },
            format!("{prefix}replicas"),
        ));
        items.push((
            Swatch::Line {
                colour,
                style: styles.ready,
            },
            format!("{prefix}ready"),
        ));
    }
    // Widths are estimated (about 7 px a character at 12 px), enough to centre the row.
    let width_of = |label: &str| 30.0 + 7.0 * label.chars().count() as f64 + 22.0;
    let total: f64 = items.iter().map(|(_, l)| width_of(l)).sum();
    let mut x = ((WIDTH - total) / 2.0).max(8.0);
    let y = HEIGHT - 26.0;
    writeln!(s, r#"<g font-size="12" fill="{TEXT}">"#)?;
    for (swatch, label) in &items {
        match swatch {
            Swatch::Area => writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y0}" width="22" height="10" fill="{DEMAND_FILL}" stroke="{DEMAND_LINE}"/>"#,
                y0 = y - 9.0
            )?,
            Swatch::Line { colour, style } => writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{y0}" x2="{x2:.1}" y2="{y0}" stroke="{colour}"{style}/>"#,
                y0 = y - 4.0,
                x2 = x + 22.0,
            )?,
        }
        writeln!(
            s,
            r#"<text x="{tx:.1}" y="{y}">{}</text>"#,
            escape(label),
            tx = x + 30.0
        )?;
        x += width_of(label);
    }
    writeln!(s, "</g>")
}

/// Appends a coordinate with at most one decimal, dropping a trailing `.0`.
fn push_coord(out: &mut String, v: f64) -> fmt::Result {
    let tenths = (v * 10.0).round();
    if tenths % 10.0 == 0.0 {
        write!(out, "{}", tenths / 10.0)
    } else {
        write!(out, "{:.1}", tenths / 10.0)
    }
}

/// Demand drawn as SVG path data, downsampled to one highest and one lowest sample per pixel column.
#[derive(Debug, Default)]
struct DemandPaths {
    /// Filled from the baseline up to the highest sample of each column.
    area: String,
    /// Filled between the lowest and highest sample of each column (shows the spread in dense data).
    band: String,
    /// The line along the highest samples.
    outline: String,
}

/// The highest and lowest sample of one pixel column, as `(x, y)` pixels.
#[derive(Debug, Clone, Copy)]
struct Extremes {
    top: (f64, f64),
    bottom: (f64, f64),
}

impl Extremes {
    fn add(&mut self, x: f64, y: f64) {
        // Pixel y grows downwards: the highest value has the smallest y.
        if y < self.top.1 {
            self.top = (x, y);
        }
        if y > self.bottom.1 {
            self.bottom = (x, y);
        }
    }
}

/// Builds the demand paths.
///
/// Missing samples break the area where the samples on either side are more than a pixel apart
/// (a narrower gap would not show, and breaking there would only bloat the file).
fn demand_paths(
    times: &[DateTime<Utc>],
    demand: &[Option<f64>],
    time: TimeAxis,
    scale: Scale,
) -> Result<DemandPaths, fmt::Error> {
    let base = scale.y(0.0_f64.clamp(scale.lo, scale.hi));
    let mut paths = DemandPaths::default();
    let mut segment: Vec<Extremes> = Vec::new();
    let mut column: Option<(i64, Extremes)> = None;
    let mut gap = false;
    let mut last_x: Option<f64> = None;

    for (&t, &d) in times.iter().zip(demand) {
        let Some(v) = d else {
            gap = true;
            continue;
        };
        let (x, y) = (time.x(t), scale.y(v));
        let breaks = gap && last_x.is_some_and(|last| x - last > 1.0);
        gap = false;
        last_x = Some(x);
        let c = TimeAxis::column(x);
        match &mut column {
            Some((current, extremes)) if *current == c && !breaks => extremes.add(x, y),
            _ => {
                segment.extend(column.map(|(_, e)| e));
                if breaks {
                    paths.push_segment(&segment, base)?;
                    segment.clear();
                }
                column = Some((
                    c,
                    Extremes {
                        top: (x, y),
                        bottom: (x, y),
                    },
                ));
            }
        }
    }
    segment.extend(column.map(|(_, e)| e));
    paths.push_segment(&segment, base)?;
    Ok(paths)
}

impl DemandPaths {
    /// Appends one unbroken stretch of columns to the three paths.
    fn push_segment(&mut self, segment: &[Extremes], base: f64) -> fmt::Result {
        let Some(first) = segment.first() else {
            return Ok(());
        };
        // A lone column is widened to a sliver so it shows.
        let lone = [
            Extremes {
                top: (first.top.0 - 0.75, first.top.1),
                bottom: (first.bottom.0 - 0.75, first.bottom.1),
            },
            Extremes {
                top: (first.top.0 + 0.75, first.top.1),
                bottom: (first.bottom.0 + 0.75, first.bottom.1),
            },
        ];
        let segment = if segment.len() == 1 {
            &lone[..]
        } else {
            segment
        };
        let (x0, x1) = (segment[0].top.0, segment[segment.len() - 1].top.0);

        self.area.push('M');
        push_point(&mut self.area, x0, base)?;
        for (i, e) in segment.iter().enumerate() {
            self.area.push('L');
            push_point(&mut self.area, e.top.0, e.top.1)?;
            self.outline.push(if i == 0 { 'M' } else { 'L' });
            push_point(&mut self.outline, e.top.0, e.top.1)?;
            self.band.push(if i == 0 { 'M' } else { 'L' });
            push_point(&mut self.band, e.top.0, e.top.1)?;
        }
        self.area.push('L');
        push_point(&mut self.area, x1, base)?;
        self.area.push('Z');
        for e in segment.iter().rev() {
            self.band.push('L');
            push_point(&mut self.band, e.bottom.0, e.bottom.1)?;
        }
        self.band.push('Z');
        Ok(())
    }
}

fn push_point(out: &mut String, x: f64, y: f64) -> fmt::Result {
    push_coord(out, x)?;
    out.push(' ');
    push_coord(out, y)
}

/// A step line (`H`/`V` path) for an integer series, downsampled per pixel column.
fn step_path(
    times: &[DateTime<Utc>],
    values: &[i32],
    time: TimeAxis,
    scale: Scale,
) -> Result<String, fmt::Error> {
    let mut out = String::new();
    let (Some(&v0), Some(&t_first), Some(&t_last)) = (values.first(), times.first(), times.last())
    else {
        return Ok(out);
    };
    let y = |v: i32| scale.y(f64::from(v));
    out.push('M');
    push_point(&mut out, time.x(t_first), y(v0))?;

    /// The changes that fell into one pixel column.
    struct Changes {
        column: i64,
        first_x: f64,
        last_x: f64,
        first: i32,
        last: i32,
        min: (usize, i32),
        max: (usize, i32),
        count: usize,
    }
    fn flush(out: &mut String, c: &Changes, y: impl Fn(i32) -> f64) -> fmt::Result {
        out.push('H');
        push_coord(out, c.first_x)?;
        out.push('V');
        push_coord(out, y(c.first))?;
        if c.count == 2 {
            out.push('H');
            push_coord(out, c.last_x)?;
        } else if c.count > 2 {
            let (a, b) = if c.min.0 <= c.max.0 {
                (c.min.1, c.max.1)
            } else {
                (c.max.1, c.min.1)
            };
            for v in [a, b] {
                out.push('V');
                push_coord(out, y(v))?;
            }
        }
        if c.count > 1 {
            out.push('V');
            push_coord(out, y(c.last))?;
        }
        Ok(())
    }

    let mut pending: Option<Changes> = None;
    for (i, pair) in values.windows(2).enumerate() {
        let (prev, v) = (pair[0], pair[1]);
        if v == prev {
            continue;
        }
        let x = time.x(times[i + 1]);
        let column = TimeAxis::column(x);
        match &mut pending {
            Some(c) if c.column == column => {
                c.last_x = x;
                c.last = v;
                c.count += 1;
                if v < c.min.1 {
                    c.min = (i, v);
                }
                if v > c.max.1 {
                    c.max = (i, v);
                }
            }
            _ => {
                if let Some(c) = pending.take() {
                    flush(&mut out, &c, y)?;
                }
                pending = Some(Changes {
                    column,
                    first_x: x,
                    last_x: x,
                    first: v,
                    last: v,
                    min: (i, v.min(prev)),
                    max: (i, v.max(prev)),
                    count: 1,
                });
            }
        }
    }
    if let Some(c) = pending.take() {
        flush(&mut out, &c, y)?;
    }
    out.push('H');
    push_coord(&mut out, time.x(t_last))?;
    Ok(out)
}

/// Escapes text for XML content and attributes; drops control characters XML 1.0 forbids.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Ticks

/// Tick values for a value axis and the scale that spans them.
struct Ticks {
    values: Vec<f64>,
    step: f64,
    scale: Scale,
}

/// About five round ticks covering `lo..=hi`; whole-number steps when `integer`.
fn nice_ticks(lo: f64, hi: f64, integer: bool) -> Ticks {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    };
    // Headroom, so the highest line does not run along the frame.
    let hi = hi + (hi - lo) * 0.06;
    let raw = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .filter(|s| !integer || s.fract() == 0.0)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    if integer {
        step = step.max(1.0);
    }
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    // Capped, so a degenerate range cannot ask for millions of ticks.
    let values: Vec<f64> = (0..=((last - first) as i64).clamp(0, 100))
        .map(|k| (first + k as f64) * step)
        .collect();
    Ticks {
        scale: Scale {
            lo: first * step,
            hi: last * step,
        },
        values,
        step,
    }
}

/// Formats an axis value with the decimals its step needs, abbreviating thousands and millions.
fn format_number(v: f64, step: f64) -> String {
    let (div, suffix) = if step >= 1e6 || v.abs() >= 1e7 {
        (1e6, "M")
    } else if step >= 1e3 || v.abs() >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let s = step / div;
    let decimals = (0..6)
        .find(|&d| {
            let scaled = s * 10f64.powi(d);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(6);
    format!("{:.*}{suffix}", decimals as usize, v / div)
}

/// Formats a number without trailing zeros (for the capacity in the legend).
fn format_plain(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Steps a time axis may use.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TimeStep {
    Seconds(i64),
    Months(i32),
    Years(i32),
}

const SECOND_STEPS: [i64; 21] = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1_800, 3_600, 7_200, 10_800, 21_600, 43_200,
    86_400, 172_800, 604_800, 1_209_600,
];
const DAY: i64 = 86_400;

/// Picks the finest step giving at most `max_ticks` ticks over `t0..=t1`.
fn time_step(t0: DateTime<Utc>, t1: DateTime<Utc>, max_ticks: i64) -> TimeStep {
    let span = (t1 - t0).num_seconds().max(1);
    if let Some(&s) = SECOND_STEPS.iter().find(|&&s| span / s <= max_ticks) {
        return TimeStep::Seconds(s);
    }
    let months = span / (30 * DAY);
    if let Some(&m) = [1, 2, 3, 6].iter().find(|&&m| months / m <= max_ticks) {
        return TimeStep::Months(m as i32);
    }
    let years = span / (365 * DAY);
    let step = (0..9)
        .flat_map(|e| [1, 2, 5].map(|m| m * 10i64.pow(e)))
        .find(|&y| years / y <= max_ticks)
        .unwrap_or(1_000_000_000);
    TimeStep::Years(i32::try_from(step).unwrap_or(i32::MAX))
}

/// Tick times in `t0..=t1` with their labels (`12:00`, `Mar 03`, `Jul 2014`, `2015`).
fn time_ticks(
    t0: DateTime<Utc>,
    t1: DateTime<Utc>,
    max_ticks: i64,
) -> Vec<(DateTime<Utc>, String)> {
    let mut ticks = Vec::new();
    match time_step(t0, t1, max_ticks) {
        TimeStep::Seconds(step) => {
            // Weeks start on Monday: 1970-01-05 was one.
            let offset = if step % (7 * DAY) == 0 { 4 * DAY } else { 0 };
            let start = t0.timestamp() - offset;
            let mut k = start.div_euclid(step) + i64::from(start.rem_euclid(step) != 0);
            while let Some(t) = Utc.timestamp_opt(k * step + offset, 0).single() {
                if t > t1 {
                    break;
                }
                let label = if step < 60 {
                    t.format("%H:%M:%S").to_string()
                } else if step < DAY && (t.hour(), t.minute()) != (0, 0) {
                    t.format("%H:%M").to_string()
                } else {
                    t.format("%b %d").to_string()
                };
                ticks.push((t, label));
                k += 1;
            }
        }
        TimeStep::Months(step) => {
            let mut month = t0.year() * 12 + t0.month0() as i32;
            let mut first = true;
            loop {
                let (y, m0) = (month.div_euclid(12), month.rem_euclid(12));
                month += 1;
                if m0 % step != 0 {
                    continue;
                }
                let Some(t) = Utc.with_ymd_and_hms(y, m0 as u32 + 1, 1, 0, 0, 0).single() else {
                    break;
                };
                if t < t0 {
                    continue;
                }
                if t > t1 {
                    break;
                }
                let label = if first || m0 == 0 {
                    t.format("%b %Y").to_string()
                } else {
                    t.format("%b").to_string()
                };
                first = false;
                ticks.push((t, label));
            }
        }
        TimeStep::Years(step) => {
            let mut year = t0.year();
            while let Some(t) = Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).single() {
                if t > t1 {
                    break;
                }
                if t >= t0 && year % step == 0 {
                    ticks.push((t, year.to_string()));
                }
                year += 1;
            }
        }
    }
    ticks
}

// ---------------------------------------------------------------------------------------------
// PNG

/// Rendering options with the system fonts loaded and `sans-serif` set to a font that exists.
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

    /// A small two-run backtest with a gap in demand.
    fn small_data() -> PlotData {
        let t0 = t("2014-07-01T00:00:00Z");
        let times: Vec<_> = (0..48).map(|i| t0 + Duration::minutes(30 * i)).collect();
        let demand = (0..48)
            .map(|i| (!(20..23).contains(&i)).then(|| 1000.0 + 800.0 * ((i as f64) / 6.0).sin()))
            .collect();
        let replicas: Vec<i32> = (0..48).map(|i| 3 + (i % 12) / 3).collect();
        let ready: Vec<i32> = (0..48usize)
            .map(|i| replicas[i.saturating_sub(1)])
            .collect();
        PlotData {
            title: "policy <web> & \"friends\"".to_string(),
            subtitle: "p95 latency ok · 3 scale-ups".to_string(),
            times,
            demand,
            capacity: Some(400.0),
            runs: vec![
                PlotRun {
                    label: "baseline".to_string(),
                    replicas: replicas.clone(),
                    ready: ready.clone(),
                },
                PlotRun {
                    label: "compare".to_string(),
                    replicas: replicas.iter().map(|r| r + 1).collect(),
                    ready: ready.iter().map(|r| r + 1).collect(),
                },
            ],
        }
    }

    /// `n` evaluations 10 s apart with noisy demand and replicas that change often.
    fn large_data(n: usize) -> PlotData {
        let t0 = t("2024-01-01T00:00:00Z");
        let times = (0..n)
            .map(|i| t0 + Duration::seconds(10 * i as i64))
            .collect();
        let demand = (0..n)
            .map(|i| {
                (i % 997 != 0).then(|| {
                    let x = i as f64;
                    5000.0 + 3000.0 * (x / 8640.0).sin() + 700.0 * (x * 12.9898).sin()
                })
            })
            .collect();
        let replicas: Vec<i32> = (0..n).map(|i| 10 + ((i * 7919) % 13) as i32).collect();
        let ready = replicas.iter().map(|r| r - 1).collect();
        PlotData {
            title: "large".to_string(),
            subtitle: String::new(),
            times,
            demand,
            capacity: None,
            runs: vec![
                PlotRun {
                    label: "a".to_string(),
                    replicas: replicas.clone(),
                    ready,
                },
                PlotRun {
                    label: "b".to_string(),
                    ready: replicas.clone(),
                    replicas,
                },
            ],
        }
    }

    #[test]
    fn svg_is_well_formed_with_legend_and_escaped_title() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("plot.svg");
        write_plot(&small_data(), &path).expect("write svg");
        let svg = std::fs::read_to_string(&path).expect("read svg");
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .collect();
        assert!(texts.contains(&"policy <web> & \"friends\""), "{texts:?}");
        for label in [
            "baseline: replicas",
            "baseline: ready",
            "compare: replicas",
            "compare: ready",
            "demand ÷ capacity (400 per replica)",
        ] {
            assert!(texts.contains(&label), "legend lacks {label:?}: {texts:?}");
        }
        // Two runs, two colours.
        assert!(svg.contains(RUN_COLOURS[0]) && svg.contains(RUN_COLOURS[1]));
        // A day of 30-minute steps gets clock-time ticks.
        assert!(texts.contains(&"12:00"), "{texts:?}");
    }

    #[test]
    fn demand_without_capacity_gets_its_own_axis() {
        let mut data = small_data();
        data.capacity = None;
        let svg = render_svg(&data).expect("render");
        assert!(svg.contains(">demand (right axis)<"));
        assert!(svg.contains(">demand</text>"));
    }

    #[test]
    fn png_has_signature_and_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("plot.PNG");
        write_plot(&small_data(), &path).expect("write png");
        let bytes = std::fs::read(&path).expect("read png");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        let image = resvg::tiny_skia::Pixmap::decode_png(&bytes).expect("decode png");
        assert_eq!(
            (f64::from(image.width()), f64::from(image.height())),
            (WIDTH, HEIGHT)
        );
    }

    #[test]
    fn png_renders_without_any_font() {
        let svg = render_svg(&small_data()).expect("render");
        let bytes = render_png(&svg, &resvg::usvg::Options::default()).expect("png");
        let image = resvg::tiny_skia::Pixmap::decode_png(&bytes).expect("decode png");
        assert_eq!(f64::from(image.width()), WIDTH);
    }

    #[test]
    fn long_run_gives_a_small_svg() {
        let data = large_data(350_000);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("large.svg");
        let started = std::time::Instant::now();
        write_plot(&data, &path).expect("write svg");
        let took = started.elapsed();
        let size = std::fs::metadata(&path).expect("stat").len();
        eprintln!("350 000 points: {size} bytes in {took:?}");
        assert!(size < 500_000, "{size} bytes");
        let svg = std::fs::read_to_string(&path).expect("read svg");
        roxmltree::Document::parse(&svg).expect("well-formed XML");
    }

    #[test]
    fn downsampling_keeps_single_sample_spikes() {
        let n = 350_000;
        let t0 = t("2024-01-01T00:00:00Z");
        let times: Vec<_> = (0..n).map(|i| t0 + Duration::seconds(i)).collect();
        let time = TimeAxis {
            t0,
            t1: times[n as usize - 1],
            right: 1000.0,
        };
        let scale = Scale { lo: 0.0, hi: 100.0 };
        let mut demand = vec![Some(10.0); n as usize];
        demand[123_457] = Some(90.0);
        demand[223_457] = Some(0.0);
        // Single missing samples, far narrower than a pixel, do not break the area.
        for i in (997..n as usize).step_by(997) {
            demand[i] = None;
        }
        let paths = demand_paths(&times, &demand, time, scale).expect("paths");
        let y = |v: f64| {
            let mut s = String::new();
            push_coord(&mut s, scale.y(v)).expect("fmt");
            format!(" {s}")
        };
        assert!(
            paths.area.contains(&y(90.0)),
            "high spike lost from the area"
        );
        assert!(
            paths.outline.contains(&y(90.0)),
            "high spike lost from the line"
        );
        assert!(
            paths.band.contains(&y(90.0)),
            "high spike lost from the band"
        );
        assert!(paths.band.contains(&y(0.0)), "low spike lost from the band");
        assert!(paths.band.len() < 40_000, "{} bytes", paths.band.len());
        assert_eq!(paths.area.matches('M').count(), 1);

        let mut replicas = vec![2; n as usize];
        replicas[200_001] = 9;
        let path = step_path(&times, &replicas, time, scale).expect("step path");
        assert!(path.contains(&format!("V{}", &y(9.0)[1..])), "{path}");
        assert!(path.len() < 200, "{path}");
    }

    #[test]
    fn gaps_break_the_demand_area() {
        let data = small_data();
        let time = TimeAxis {
            t0: data.times[0],
            t1: data.times[47],
            right: 1200.0,
        };
        let scale = Scale {
            lo: 0.0,
            hi: 2000.0,
        };
        let paths = demand_paths(&data.times, &data.demand, time, scale).expect("paths");
        for p in [&paths.area, &paths.band, &paths.outline] {
            assert_eq!(p.matches('M').count(), 2, "{p}");
        }
        // All-missing demand draws no area at all.
        let none = vec![None; data.times.len()];
        let paths = demand_paths(&data.times, &none, time, scale).expect("paths");
        assert!(paths.area.is_empty() && paths.band.is_empty() && paths.outline.is_empty());
    }

    #[test]
    fn unsupported_extension_names_it() {
        let data = small_data();
        for name in ["plot.jpg", "plot"] {
            let path = Path::new("/nonexistent").join(name);
            let err = write_plot(&data, &path).expect_err("bad extension");
            assert!(matches!(err, PlotError::Extension { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(".svg or .png"), "{msg}");
        }
        let err = write_plot(&data, Path::new("/plot.jpg")).expect_err("bad extension");
        assert!(err.to_string().contains("\"jpg\""), "{err}");
    }

    #[test]
    fn write_failure_names_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("missing-dir").join("plot.svg");
        let err = write_plot(&small_data(), &path).expect_err("no such directory");
        assert!(matches!(err, PlotError::Write { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn mismatched_or_empty_series_are_rejected() {
        let mut data = small_data();
        data.runs[1].ready.pop();
        let err = write_plot(&data, Path::new("out.svg")).expect_err("length");
        assert_eq!(
            err.to_string(),
            "out.svg: run `compare` ready has 47 values but there are 48 evaluation times"
        );
        let mut data = small_data();
        data.times.clear();
        let err = write_plot(&data, Path::new("out.svg")).expect_err("empty");
        assert!(matches!(err, PlotError::NoData { .. }), "{err}");
    }

    #[test]
    fn single_evaluation_still_plots() {
        let mut data = small_data();
        data.times.truncate(1);
        data.demand.truncate(1);
        for run in &mut data.runs {
            run.replicas.truncate(1);
            run.ready.truncate(1);
        }
        let svg = render_svg(&data).expect("render");
        roxmltree::Document::parse(&svg).expect("well-formed XML");
    }

    #[test]
    fn time_ticks_follow_the_span() {
        let labels = |a: &str, b: &str| -> Vec<String> {
            time_ticks(t(a), t(b), 10)
                .into_iter()
                .map(|(_, l)| l)
                .collect()
        };
        assert_eq!(
            labels("2024-03-03T06:10:00Z", "2024-03-03T18:00:00Z"),
            ["08:00", "10:00", "12:00", "14:00", "16:00", "18:00"]
        );
        // Midnight shows the date instead of 00:00.
        assert_eq!(
            labels("2024-03-02T20:00:00Z", "2024-03-03T12:00:00Z"),
            [
                "20:00", "22:00", "Mar 03", "02:00", "04:00", "06:00", "08:00", "10:00", "12:00"
            ]
        );
        // Multi-day steps count days from the Unix epoch, so ticks stay put as the span moves.
        assert_eq!(
            labels("2024-03-01T00:00:00Z", "2024-03-14T00:00:00Z"),
            [
                "Mar 02", "Mar 04", "Mar 06", "Mar 08", "Mar 10", "Mar 12", "Mar 14"
            ]
        );
        assert_eq!(
            labels("2014-07-01T00:00:00Z", "2015-01-31T23:30:00Z"),
            ["Jul 2014", "Aug", "Sep", "Oct", "Nov", "Dec", "Jan 2015"]
        );
        assert_eq!(
            labels("2001-06-01T00:00:00Z", "2024-01-01T00:00:00Z"),
            ["2005", "2010", "2015", "2020"]
        );
        // Week ticks fall on Mondays.
        for (tick, _) in time_ticks(t("2024-01-01T00:00:00Z"), t("2024-03-31T00:00:00Z"), 14) {
            assert_eq!(tick.weekday(), chrono::Weekday::Mon);
        }
    }

    #[test]
    fn value_ticks_are_round() {
        let ticks = nice_ticks(0.0, 23.0, true);
        assert_eq!(ticks.values, [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]);
        let ticks = nice_ticks(0.0, 2.0, true);
        assert_eq!(ticks.values, [0.0, 1.0, 2.0, 3.0]);
        assert!(
            nice_ticks(0.0, 3.0, true)
                .values
                .iter()
                .all(|v| v.fract() == 0.0)
        );
        let ticks = nice_ticks(0.0, 0.9, false);
        assert_eq!(ticks.step, 0.2);
        assert_eq!(format_number(0.4, 0.2), "0.4");
        assert_eq!(format_number(25_000.0, 5_000.0), "25k");
        assert_eq!(format_number(2_500.0, 2_500.0), "2.5k");
        assert_eq!(format_number(3_000_000.0, 1_000_000.0), "3M");
        assert_eq!(format_number(15.0, 5.0), "15");
        assert_eq!(format_plain(1500.0), "1500");
        assert_eq!(format_plain(0.25), "0.25");
    }

    #[test]
    fn escape_handles_markup_and_controls() {
        assert_eq!(
            escape("a<b>&\"c\"'\u{7}\n"),
            "a&lt;b&gt;&amp;&quot;c&quot;&apos; "
        );
    }
}
