//! `kscale backtest --report FILE.html`: one self-contained HTML file (inline CSS and SVG, no
//! script, no network, no external font) with the summaries side by side, the verdict line,
//! each policy's SLO violations, and the plot's panels ([`super::plot::panels`]), each a
//! `<figure>` whose id is the panel's id. The tables carry every figure, so the report reads
//! without the pictures.

use std::fmt::Write as _;
use std::path::Path;

use super::Summary;
use super::plot::{PlotData, PlotError, panel_svg, panels, validate};

/// What a report shows besides the plot data.
#[derive(Debug, Clone)]
pub struct ReportInput<'a> {
    /// The runs' data (the same as `--plot` draws).
    pub plot: &'a PlotData,
    /// Each policy's summary, in the order of `plot.runs`.
    pub summaries: Vec<&'a Summary>,
    /// The verdict line (with a compared policy).
    pub verdict: Option<String>,
    /// How the backtest was run: (label, value) lines, e.g. ("trace", "…csv (4032 rows)").
    pub setup: Vec<(String, String)>,
}

/// How many SLO-violation stretches are listed per policy.
pub const LISTED_VIOLATIONS: usize = 10;

/// The summary table, one row per figure and one column per policy; the terminal table and the
/// report's both come from here.
pub fn summary_rows(summaries: &[&Summary]) -> Vec<(&'static str, Vec<String>)> {
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    let each = |f: &dyn Fn(&Summary) -> String| summaries.iter().map(|s| f(s)).collect();
    vec![
        ("policy", each(&|s| s.policy.clone())),
        ("evaluations", each(&|s| s.evaluations.to_string())),
        (
            "replica-hours",
            each(&|s| format!("{:.1}", s.replica_hours)),
        ),
        (
            "scaling actions",
            each(&|s| {
                format!(
                    "{} ({} up, {} down)",
                    s.scaling_actions, s.scale_ups, s.scale_downs
                )
            }),
        ),
        (
            "replicas min/max",
            each(&|s| format!("{}/{}", s.min_replicas, s.max_replicas)),
        ),
        (
            "degraded evaluations",
            each(&|s| s.degraded_evaluations.to_string()),
        ),
        (
            "SLO-violation minutes",
            each(&|s| opt(s.slo_violation_minutes, 1)),
        ),
        (
            "oracle replica-hours",
            each(&|s| opt(s.oracle_replica_hours, 1)),
        ),
        (
            "unbounded oracle r-h",
            each(&|s| opt(s.oracle_unbounded_replica_hours, 1)),
        ),
        ("ratio to oracle", each(&|s| opt(s.ratio_to_oracle, 3))),
        (
            "accuracy U/O %",
            each(&|s| {
                s.elasticity.map_or("-".into(), |e| {
                    format!("{:.2}/{:.2}", e.accuracy_under, e.accuracy_over)
                })
            }),
        ),
        (
            "timeshare U/O %",
            each(&|s| {
                s.elasticity.map_or("-".into(), |e| {
                    format!("{:.2}/{:.2}", e.timeshare_under, e.timeshare_over)
                })
            }),
        ),
    ]
}

/// Escapes text for HTML content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:#1f2937;\
margin:24px auto;max-width:1200px;padding:0 16px;line-height:1.45}\
h1{font-size:1.5em;margin:0 0 4px}h2{font-size:1.15em;margin:28px 0 8px;border-bottom:1px solid #e5e7eb}\
h3{font-size:1em;margin:16px 0 4px}\
.verdict{font-size:1.15em;font-weight:600;background:#eff6ff;border-left:4px solid #1d4ed8;padding:8px 12px}\
table{border-collapse:collapse;font-variant-numeric:tabular-nums}\
th,td{border:1px solid #e5e7eb;padding:4px 10px;text-align:right}th:first-child,td:first-child{text-align:left}\
thead th{background:#f9fafb}dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}\
dt{color:#6b7280}dd{margin:0}figure{margin:12px 0}figure svg{width:100%;height:auto;display:block}\
figcaption{font-size:.9em;color:#6b7280}.legend span{display:inline-block;margin-right:18px}\
.swatch{display:inline-block;width:14px;height:10px;margin-right:6px;vertical-align:middle}";

/// The report as one HTML document.
pub fn render_html(input: &ReportInput<'_>) -> Result<String, String> {
    let data = input.plot;
    let mut h = String::new();
    let w = |e: std::fmt::Error| e.to_string();
    write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>kscale backtest: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1 id=\"title\">{}</h1>\n",
        escape(&data.title),
        escape(&data.title)
    )
    .map_err(w)?;
    if let Some(v) = &input.verdict {
        writeln!(h, "<p class=\"verdict\" id=\"verdict\">{}</p>", escape(v)).map_err(w)?;
    }
    h.push_str("<dl id=\"setup\">\n");
    for (k, v) in &input.setup {
        writeln!(h, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(v)).map_err(w)?;
    }
    h.push_str("</dl>\n<h2>Summary</h2>\n<table id=\"summary\">\n");
    for (i, (label, values)) in summary_rows(&input.summaries).iter().enumerate() {
        let cell = if i == 0 { "th" } else { "td" };
        if i == 0 {
            h.push_str("<thead>");
        }
        write!(h, "<tr><th scope=\"row\">{}</th>", escape(label)).map_err(w)?;
        for v in values {
            write!(h, "<{cell}>{}</{cell}>", escape(v)).map_err(w)?;
        }
        h.push_str("</tr>\n");
        if i == 0 {
            h.push_str("</thead><tbody>\n");
        }
    }
    h.push_str("</tbody></table>\n");
    h.push_str(
        "<p>Ratio to oracle: replica-hours over those of a perfect-foresight oracle held to the \
         policy's own minReplicas and maxReplicas (1.0 is the least any policy with these bounds \
         can run); the unbounded oracle runs exactly what demand needs, 0 when idle.</p>\n",
    );
    if let Some(capacity) = data.capacity {
        h.push_str("<h2>SLO violations</h2>\n<div id=\"violations\">\n");
        for s in &input.summaries {
            writeln!(
                h,
                "<h3>{}: {} stretches, {:.1} minutes</h3>",
                escape(&s.policy),
                s.slo_violations.len(),
                s.slo_violation_minutes.unwrap_or(0.0)
            )
            .map_err(w)?;
            if s.slo_violations.is_empty() {
                continue;
            }
            h.push_str("<ul>\n");
            for v in s.slo_violations.iter().take(LISTED_VIOLATIONS) {
                writeln!(h, "<li>{}</li>", escape(&v.describe(capacity))).map_err(w)?;
            }
            if let Some(more) = s.slo_violations.len().checked_sub(LISTED_VIOLATIONS)
                && more > 0
            {
                writeln!(
                    h,
                    "<li>… and {more} more (--format json lists them all)</li>"
                )
                .map_err(w)?;
            }
            h.push_str("</ul>\n");
        }
        h.push_str("</div>\n");
    }
    h.push_str(
        "<h2>Panels</h2>\n<p class=\"legend\">\
         <span><i class=\"swatch\" style=\"background:#cbd5e1\"></i>demand (÷ capacity: the replicas it needs)</span>\
         <span><i class=\"swatch\" style=\"background:#111827;height:2px\"></i>ready replicas</span>\
         <span><i class=\"swatch\" style=\"background:#1d4ed8;height:3px\"></i>replicas</span>\
         <span><i class=\"swatch\" style=\"background:#fca5a5\"></i>demand above ready capacity</span><br>\
         Where a panel spans too many evaluations to draw each one (the whole run of a long replay), it shows bins \
         of equal time: the replicas' mean as a line and their range as a band, and demand's peak; each panel's \
         legend names the bin's width.</p>\n",
    );
    let mut section = None;
    for panel in panels(data) {
        if section != Some(panel.window.section) {
            section = Some(panel.window.section);
            writeln!(
                h,
                "<h3 id=\"section-{}\">{}</h3>",
                panel.window.section.id(),
                escape(&panel.window.caption)
            )
            .map_err(w)?;
        }
        let svg = panel_svg(data, &panel, super::plot::WIDTH)?;
        writeln!(
            h,
            "<figure class=\"panel\" id=\"{}\">\n{}\n<figcaption>{}</figcaption>\n</figure>",
            panel.id,
            svg.trim(),
            escape(&panel.title)
        )
        .map_err(w)?;
    }
    h.push_str("</body>\n</html>\n");
    Ok(h)
}

/// Writes the report to `path`.
pub fn write_report(input: &ReportInput<'_>, path: &Path) -> Result<(), PlotError> {
    validate(input.plot, path)?;
    let html = render_html(input).map_err(|message| PlotError::Render {
        path: path.to_path_buf(),
        message,
    })?;
    std::fs::write(path, html).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backtest::plot::PlotRun;
    use chrono::{DateTime, TimeDelta};

    fn summary(policy: &str, hours: f64) -> Summary {
        let t = DateTime::from_timestamp(0, 0).expect("epoch");
        Summary {
            policy: policy.into(),
            start: t,
            end: t,
            evaluations: 3,
            replica_hours: hours,
            scaling_actions: 1,
            scale_ups: 1,
            scale_downs: 0,
            min_replicas: 1,
            max_replicas: 2,
            degraded_evaluations: 0,
            slo_violation_minutes: Some(0.0),
            slo_violations: Vec::new(),
            oracle_replica_hours: Some(2.0),
            oracle_unbounded_replica_hours: Some(1.0),
            ratio_to_oracle: Some(hours / 2.0),
            elasticity: None,
        }
    }

    #[test]
    fn the_report_is_one_escaped_self_contained_page_with_tables_and_panels() {
        let t0 = DateTime::from_timestamp(0, 0).expect("epoch");
        let times: Vec<_> = (0..3).map(|i| t0 + TimeDelta::minutes(i)).collect();
        let run = |label: &str| PlotRun {
            label: label.into(),
            replicas: vec![1, 2, 2],
            ready: vec![1, 1, 2],
            violations: Vec::new(),
        };
        let data = PlotData {
            title: "a <b> & c".into(),
            subtitle: String::new(),
            times,
            demand: vec![Some(10.0), None, Some(30.0)],
            capacity: Some(20.0),
            runs: vec![run("a<b>"), run("hpa")],
        };
        let (a, b) = (summary("a<b>", 3.0), summary("hpa", 4.0));
        let html = render_html(&ReportInput {
            plot: &data,
            summaries: vec![&a, &b],
            verdict: Some("a<b>: −25 % replica-hours vs hpa".into()),
            setup: vec![("trace".into(), "t.csv".into())],
        })
        .expect("html");
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(
            html.contains("<h1 id=\"title\">a &lt;b&gt; &amp; c</h1>"),
            "{html}"
        );
        assert!(html.contains("id=\"verdict\">a&lt;b&gt;: −25 % replica-hours vs hpa</p>"));
        assert!(html.contains(
            "<thead><tr><th scope=\"row\">policy</th><th>a&lt;b&gt;</th><th>hpa</th></tr>"
        ));
        assert!(html.contains("<td>3.0</td><td>4.0</td>"));
        assert!(
            html.contains("<td>1.500</td><td>2.000</td>"),
            "ratio to oracle row"
        );
        // One run shorter than 36 hours without violations: the whole run only, one panel each.
        assert_eq!(html.matches("<figure").count(), 2);
        assert!(
            html.contains("id=\"panel-overview-0\"") && html.contains("id=\"panel-overview-1\"")
        );
        for needle in ["<script", "<link", "src=", "href=", "url("] {
            assert!(!html.contains(needle), "{needle}");
        }
    }
}
