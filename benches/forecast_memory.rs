//! Memory of one forecast metric's state, counted by a global allocator: a `Forecaster` fed a
//! full history and forecasting, for the default histories of each model at one-minute buckets.
//! The controller keeps one per Prometheus metric of each policy with `spec.forecast`.
//!
//! Target: under 200 KiB for a daily Holt-Winters model on its default 7 days.
//!
//! Run: `cargo bench --bench forecast_memory`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use chrono::{DateTime, TimeDelta, Utc};
use kscale::policy::forecast::{ForecastSettings, Forecaster, ModelKind};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` holds for `System.alloc` too.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as for `realloc` on `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn measure(label: &str, model: ModelKind, season: TimeDelta, history: TimeDelta) {
    let settings = ForecastSettings {
        model,
        season,
        horizon: TimeDelta::seconds(60),
        history,
        step: TimeDelta::minutes(1),
        refit: TimeDelta::hours(6),
        confidence: 0.999,
        min_headroom: 0.5,
    };
    let start = DateTime::<Utc>::from_timestamp(1_700_000_040, 0).unwrap_or_default();
    let minutes = history.num_minutes() + 60;
    let before = LIVE.load(Ordering::Relaxed);
    let mut f = Forecaster::new(settings, 100.0);
    let mut last = None;
    for i in 0..minutes {
        let day = (i as f64 / 1440.0) * std::f64::consts::TAU;
        let noise = ((i * 7919) % 101) as f64 / 101.0 - 0.5;
        let now = start + TimeDelta::minutes(i);
        f.observe(now, 500.0 + 300.0 * day.sin() + 40.0 * noise);
        // Forecast every evaluation of the last hour, as the controller would (the first ones
        // fit the model on the whole history).
        if i >= minutes - 60 {
            last = f.forecast(now);
        }
    }
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    std::hint::black_box((&f, last));
    println!(
        "{label:<40} {:>8.1} KiB   ({} one-minute buckets)",
        bytes as f64 / 1024.0,
        history.num_minutes()
    );
}

fn main() {
    println!("forecast state per metric (live heap bytes after a full history)\n");
    measure(
        "Trend, history 1d",
        ModelKind::Trend,
        TimeDelta::days(1),
        TimeDelta::days(1),
    );
    measure(
        "HoltWinters daily, history 7d",
        ModelKind::HoltWinters,
        TimeDelta::days(1),
        TimeDelta::days(7),
    );
    measure(
        "HoltWinters weekly, history 21d",
        ModelKind::HoltWinters,
        TimeDelta::days(7),
        TimeDelta::days(21),
    );
}
