//! `kscale backtest --report` rendered by a real browser: headless Chromium from Debian
//! (`scripts/ci-testenv-setup` installs it). The report must load with no console error and no
//! request, show every panel, and screenshot at the size asked for with a picture in it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "support/readme_backtest.rs"]
mod readme_backtest;
use readme_backtest::elb_comparison;

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 3000;

fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
        .expect(
            "no headless browser: install Debian's chromium (scripts/ci-testenv-setup does, \
             or `apt-get install -y chromium`)",
        )
}

/// Runs headless Chromium on `page` with `args`; stdout (the DOM with --dump-dom) and stderr
/// (the browser's log, console messages included).
fn browse(page: &Path, profile: &Path, args: &[String]) -> Output {
    let out = Command::new("timeout")
        .arg("180")
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The browser log's console messages and failed loads.
fn console_problems(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| {
            l.contains("CONSOLE") || l.contains("Failed to load resource") || l.contains("net::ERR")
        })
        .map(str::to_string)
        .collect()
}

fn report(dir: &Path) -> PathBuf {
    let path = dir.join("report.html");
    let o = Command::new(env!("CARGO_BIN_EXE_kscale"))
        .args(elb_comparison(&["--report"]))
        .arg(&path)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("kscale runs");
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    path
}

#[test]
fn the_report_renders_in_headless_chromium_with_every_panel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let page = report(dir.path());
    let html = std::fs::read_to_string(&page).expect("report");
    // Self-contained: nothing to fetch, nothing to run.
    for needle in [
        "<script", "<link", "src=", "href=", "url(", "@import", "https://",
    ] {
        assert!(!html.contains(needle), "the report holds {needle:?}");
    }

    // Every panel is in the DOM the browser built: the whole run, the busiest day and the worst
    // violation, one figure per policy each, each with its chart.
    let dom = browse(
        &page,
        &dir.path().join("profile-dom"),
        &["--dump-dom".into()],
    );
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    let ids = [
        "panel-overview-0",
        "panel-overview-1",
        "panel-busiest-day-2",
        "panel-busiest-day-3",
        "panel-worst-violation-4",
        "panel-worst-violation-5",
    ];
    for id in ids {
        let at = dom_text
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no {id} in the DOM"));
        let figure = &dom_text[at..];
        let end = figure.find("</figure>").expect("figure closes");
        assert!(figure[..end].contains("<svg"), "{id} has no chart");
    }
    assert_eq!(dom_text.matches("<figure").count(), ids.len());
    for text in [
        "id=\"verdict\"",
        "shop/backend: \u{2212}11 % replica-hours, +64 % SLO-violation minutes, \u{2212}37 % scaling actions vs shop/backend-hpa-cpu",
        "id=\"summary\"",
        "<td>1094.1</td><td>1233.7</td>",
        "<td>1023.7</td><td>1023.7</td>",
    ] {
        assert!(dom_text.contains(text), "the DOM lacks {text:?}");
    }
    assert_eq!(console_problems(&dom.stderr), Vec::<String>::new());

    // A screenshot of the size asked for, with a picture in it.
    let shot = dir.path().join("report.png");
    let o = browse(
        &page,
        &dir.path().join("profile-shot"),
        &[
            format!("--screenshot={}", shot.display()),
            format!("--window-size={WIDTH},{HEIGHT}"),
        ],
    );
    assert_eq!(console_problems(&o.stderr), Vec::<String>::new());
    let png = std::fs::read(&shot).expect("screenshot written");
    let image = resvg::tiny_skia::Pixmap::decode_png(&png).expect("a PNG");
    assert_eq!((image.width(), image.height()), (WIDTH, HEIGHT));
    let pixels = image.pixels();
    let inked = pixels
        .iter()
        .filter(|p| p.red() < 200 || p.green() < 200 || p.blue() < 200)
        .count();
    let share = inked as f64 / pixels.len() as f64;
    assert!(
        share > 0.02,
        "the screenshot is nearly blank: {share:.4} inked"
    );
    // The red SLO bands, the blue and the orange runs all reach the screen.
    let colour = |r: u8, g: u8, b: u8| {
        pixels.iter().any(|p| {
            p.red().abs_diff(r) < 12 && p.green().abs_diff(g) < 12 && p.blue().abs_diff(b) < 12
        })
    };
    assert!(colour(29, 78, 216), "no blue run line");
    assert!(colour(234, 88, 12), "no orange run line");
    if let Ok(keep) = std::env::var("KSCALE_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).expect("keep the screenshot");
    }
}

/// The console check above would see an error: a page that logs one is caught.
#[test]
fn a_console_error_is_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("bad.html");
    std::fs::write(
        &page,
        "<!DOCTYPE html><html><body><script>console.error('boom')</script></body></html>",
    )
    .expect("write");
    let o = browse(&page, &dir.path().join("profile"), &["--dump-dom".into()]);
    let problems = console_problems(&o.stderr);
    assert!(
        problems.iter().any(|l| l.contains("boom")),
        "{problems:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
