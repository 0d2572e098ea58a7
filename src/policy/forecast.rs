//! Demand forecasting for `spec.forecast`: exponential smoothing on a fixed time grid.
//!
//! Pure like the rest of `policy/`: the history comes in as arguments (each evaluation's metric
//! value, or a Prometheus `query_range` after a restart) and every time is a parameter; nothing
//! here reads a clock or does I/O. The one state shared between calls is a memo of the fit's grid
//! search keyed by the history's content (see [`memo`]): it saves CPU and never changes a result.
//!
//! Two models, written here rather than taken from a crate (the forecasting crates on crates.io
//! bring large dependency trees, fit with numeric optimisers whose results change between
//! versions, and forecast in whole-series batches; the controller needs an incremental, tiny,
//! deterministic state that is cheap to update every evaluation):
//! - `Trend`: Holt's linear method with a damped trend, for ramps;
//! - `HoltWinters`: additive Holt-Winters (damped trend plus a daily or weekly season).
//!
//! Values are averaged into buckets of `step`. A model is fitted (a grid search for the smoothing
//! factors that minimise the one-step-ahead squared error; on a tie the most responsive) on the
//! last `history` of buckets, at fixed points of the history itself: the last bucket before each
//! multiple of `refit` in absolute time, the buckets at which a young history has doubled, and
//! a surprise (a completed bucket whose error is beyond the `confidence` quantile, a new
//! regime) an hour or more after the last surprise that refitted; between fits each completed bucket only updates the model's state (O(1)) and its
//! sliding window of errors. So the forecast is a function of the history and the time alone:
//! the controller running for days, the controller just restarted (a history read), `dry-run`
//! and the backtest forecast alike from the same values.
//!
//! A forecast is made from inside the current bucket (its values so far smooth the state
//! provisionally) for the bucket holding `now + horizon`, `h` buckets on: the point forecast `ŷ`
//! plus the headroom `max(q · g · max(ŷ, 0.2 · peak) · √h, min_headroom · target)`. Here `q` is
//! the `confidence` quantile of the model's relative one-step under-forecasts over the last
//! history's worth of buckets (`max(e, 0) / max(prediction, 0.2 · peak)`: an upper bound covers
//! values above the forecast, so a value below it, a fall or a step down, counts 0; empirical,
//! since demand errors have heavy tails, and relative, since they grow with the level), `g` 1
//! where the window holds enough errors to support that quantile and otherwise follows the last
//! three under-forecasts against the window's mean (see [`Fitted::recency`]: a young history's
//! headroom decays once the model predicts well again, instead of lasting a history after one
//! surprise, and a value below its forecast never raises it), `peak` the fitted history's
//! largest value, and `min_headroom · target` a floor for bursts the history has not shown.
//!
//! The trend is extrapolated only as far as the last three bucket-to-bucket changes of the
//! deseasonalised value confirm it (all of its sign; no steeper than the gentlest): a step or
//! the end of a ramp is a new level, not a lasting trend. The fit scores the same predictions.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, TimeDelta, Utc};

use crate::model::Sample;
pub use crate::model::{ModelKind, Prediction};

/// A compiled `spec.forecast`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForecastSettings {
    /// The model.
    pub model: ModelKind,
    /// Season length (Holt-Winters only).
    pub season: TimeDelta,
    /// How far ahead to size for (default: the pod start-up time).
    pub horizon: TimeDelta,
    /// How much history the model keeps (and the controller re-reads after a restart).
    pub history: TimeDelta,
    /// Bucket width.
    pub step: TimeDelta,
    /// How often the model is refitted.
    pub refit: TimeDelta,
    /// The quantile of the relative one-step errors used as headroom, in [0.5, 1].
    pub confidence: f64,
    /// The least headroom, in units of each metric's target (see [`Forecaster::new`]).
    pub min_headroom: f64,
}

impl ForecastSettings {
    /// Buckets in one season.
    fn season_buckets(&self) -> usize {
        (self.season.num_milliseconds() / self.step.num_milliseconds().max(1)).max(1) as usize
    }

    /// Buckets of history a fit sees.
    fn history_buckets(&self) -> usize {
        (self.history.num_milliseconds() / self.step.num_milliseconds().max(1)).max(1) as usize
    }

    /// The scheduled refit period in buckets, at least one and at most the history.
    fn refit_buckets(&self) -> usize {
        let refit = self.refit.num_milliseconds() / self.step.num_milliseconds().max(1);
        (refit.max(1) as usize).min(self.history_buckets())
    }

    /// The fewest buckets between two refits that surprises make: an hour's worth, at least one
    /// and at most the scheduled period. A run of surprises (a noisy stretch, a new regime
    /// arriving over several buckets) then costs one fit an hour, not one a bucket: a fit scores
    /// every parameter set over the whole history, so this bounds the CPU a policy's forecast
    /// can take to about `24 + 24h / refit` fits a day whatever its metric does.
    fn surprise_refit_gap(&self) -> i64 {
        let hour = TimeDelta::hours(1).num_milliseconds() / self.step.num_milliseconds().max(1);
        hour.clamp(1, self.refit_buckets() as i64)
    }

    /// Buckets of history kept: a fit's history, plus the buckets since the last scheduled fit
    /// and one spare (a history read's first bucket may be partial). So the window of the fit
    /// in use is always held, and a forecaster started now (a history read) holds what one
    /// running for days holds.
    fn held_buckets(&self) -> usize {
        self.history_buckets() + self.refit_buckets() + 1
    }

    /// How far back a history read goes: [`ForecastSettings::held_buckets`] worth.
    pub fn held(&self) -> TimeDelta {
        self.step * self.held_buckets() as i32
    }

    fn bucket_of(&self, t: DateTime<Utc>) -> i64 {
        t.timestamp_millis()
            .div_euclid(self.step.num_milliseconds().max(1))
    }
}

/// Smoothing factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Level.
    pub alpha: f64,
    /// Trend.
    pub beta: f64,
    /// Season.
    pub gamma: f64,
    /// Trend damping.
    pub phi: f64,
}

/// A fitted model and its running state, in units of the series divided by `scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    /// The model actually fitted (Holt-Winters falls back to Trend with under two seasons).
    pub kind: ModelKind,
    /// Smoothing factors.
    pub params: Params,
    level: f64,
    trend: f64,
    /// Seasonal offsets, indexed by absolute bucket number modulo their count; empty for Trend.
    season: Vec<f64>,
    /// Absolute number of the next bucket the state expects.
    next: i64,
    /// Root-mean-square one-step error (scaled units).
    sigma: f64,
    /// The relative one-step under-forecasts `max(e, 0) / max(prediction, REL_FLOOR)` of the
    /// last `window` buckets (the fitted history, then each bucket as it completes), ascending:
    /// the errors the upper bound must cover (a value below its prediction counts 0). `f32`: a
    /// quantile needs no more precision, and the window is as long as the history.
    rel_errors: Vec<f32>,
    /// The same buckets' relative errors in time order, oldest first, signed: an under-forecast
    /// as in `rel_errors` (0 while a surprise waits), an over-forecast negative.
    recent: VecDeque<f32>,
    /// How many errors are kept: the history's length in buckets.
    window: usize,
    /// The sum of `recent`'s under-forecasts (its positive part), for their window mean.
    recent_sum: f64,
    /// The sum of `recent`'s sizes (under- and over-forecasts alike), for their window mean.
    size_sum: f64,
    /// The share of the quantile the recent errors call for (see [`Fitted::recency`]), as of
    /// the last bucket fed.
    share: f64,
    /// The last value fed, less its season (scaled); `None` after a gap.
    last_plain: Option<f64>,
    /// The last [`CONFIRM`] bucket-to-bucket changes of that value, oldest first.
    slopes: VecDeque<f64>,
    /// The series is divided by this before fitting, so huge values cannot overflow.
    scale: f64,
    /// How many errors have entered `recent` in all (the sequence number of the next one).
    seen: u64,
    /// Surprises not yet known to be level shifts.
    shifts: Shifts,
    /// The sequence number of the last error forgiven as a level shift.
    last_shift: Option<u64>,
    /// The last value more than [`SURPRISE`] below its prediction (a fall): its error's
    /// sequence number, its (deseasonalised) value and the prediction it missed.
    fall: Option<(u64, f64, f64)>,
}

/// A surprise waiting to be told a level shift or a burst: its error's sequence number in
/// `recent` and the error itself, its (deseasonalised) value and the prediction it missed, and
/// how many buckets since have stayed nearer the value than the prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shift {
    seq: u64,
    error: f32,
    value: f64,
    predicted: f64,
    held: usize,
}

/// The surprises of the last few buckets, each counted as 0 in the window the headroom is taken
/// from until it is known what it was. One whose new level holds for [`CONFIRM`] buckets (each
/// nearer its value than the prediction it missed) was a level shift, a step or the end of a
/// ramp: the model follows the new level, so that error does not recur, and it stays 0, as
/// long as such shifts are rare (see [`Fitted::observe_bucket`]). One that comes back was a
/// burst, which may come again: its error enters the window at the first bucket that comes
/// back. So one step neither sets the headroom for a whole history nor scales the target up to
/// its ceiling while it is being told apart.
#[derive(Debug, Clone, Default, PartialEq)]
struct Shifts {
    pending: VecDeque<Shift>,
}

impl Shifts {
    /// At most this many surprises wait at once (a run of them is one change).
    const MAX: usize = 8;

    /// A new surprise; returns the oldest one if it had to make room (its error is admitted).
    fn surprise(&mut self, shift: Shift) -> Option<Shift> {
        let out = (self.pending.len() == Self::MAX)
            .then(|| self.pending.pop_front())
            .flatten();
        self.pending.push_back(shift);
        out
    }

    /// The next bucket's deseasonalised value (`None`: a gap, which tells nothing, so every
    /// waiting error is a burst); returns the surprises now known to be bursts and those now
    /// known to be level shifts.
    fn next(&mut self, plain: Option<f64>) -> (Vec<Shift>, Vec<Shift>) {
        let Some(y) = plain else {
            return (self.pending.drain(..).collect(), Vec::new());
        };
        let (mut bursts, mut shifts) = (Vec::new(), Vec::new());
        self.pending.retain_mut(|s| {
            if (y - s.value).abs() >= (y - s.predicted).abs() {
                bursts.push(*s);
                return false;
            }
            s.held += 1;
            if s.held >= CONFIRM {
                shifts.push(*s);
                return false;
            }
            true
        });
        (bursts, shifts)
    }
}

/// Relative errors are taken against at least this fraction of the history's peak, so a
/// near-zero level does not make every error look infinite.
const REL_FLOOR: f64 = 0.2;
const ALPHAS: [f64; 6] = [0.1, 0.25, 0.4, 0.6, 0.85, 1.0];
const BETAS: [f64; 5] = [0.01, 0.05, 0.2, 0.5, 0.8];
const GAMMAS: [f64; 3] = [0.05, 0.15, 0.35];
const PHIS: [f64; 2] = [0.9, 0.98];
/// A trend is extrapolated only once this many consecutive bucket-to-bucket changes of the
/// (deseasonalised) value confirm it, and never steeper than the gentlest of them: a step
/// (one large change among flat ones) is a new level, not a lasting trend.
const CONFIRM: usize = 3;
/// Where the window holds too few errors to support the `confidence` quantile, the learned
/// headroom follows the recent errors: see [`Fitted::recency`].
const RECENT: usize = 3;
/// A completed bucket is a surprise, and the model is refitted on the history up to it, when
/// its relative error is above the `confidence` quantile of the errors so far and above this
/// (5 %, so that noise on a flat history, whose quantile is 0, is no surprise).
const SURPRISE: f64 = 0.05;
/// Scores within this relative margin are a tie, which the more responsive parameters win
/// (see [`fit`]); the margin is far above rounding noise and far below any real difference.
const TIE: f64 = 1e-9;
/// A fit checks every this many scored buckets whether a parameter set can still win.
const BOUND_EVERY: usize = 64;

/// The trend a forecast extrapolates: `trend` as far as the recent changes `slopes` confirm it
/// (all of the same sign as the trend, [`CONFIRM`] of them), and no steeper than the gentlest.
fn confirmed_trend(trend: f64, slopes: impl Iterator<Item = f64>) -> f64 {
    let (mut n, mut gentlest) = (0usize, f64::INFINITY);
    for d in slopes {
        if d * trend <= 0.0 || !d.is_finite() {
            return 0.0;
        }
        n += 1;
        gentlest = gentlest.min(d.abs());
    }
    if n < CONFIRM {
        return 0.0;
    }
    trend.signum() * trend.abs().min(gentlest)
}

impl Fitted {
    fn season_at(&self, bucket: i64) -> f64 {
        if self.season.is_empty() {
            0.0
        } else {
            self.season[bucket.rem_euclid(self.season.len() as i64) as usize]
        }
    }

    /// The level and trend after seeing `y` (scaled) in bucket `self.next`, without moving there.
    fn smoothed(&self, y: f64) -> (f64, f64) {
        let Params {
            alpha, beta, phi, ..
        } = self.params;
        let s = self.season_at(self.next);
        let level = alpha * (y - s) + (1.0 - alpha) * (self.level + phi * self.trend);
        let trend = beta * (level - self.level) + (1.0 - beta) * phi * self.trend;
        (level, trend)
    }

    /// The trend the next prediction extrapolates (see [`confirmed_trend`]), given the change
    /// `pending` of a value not yet fed (a bucket being filled), if any.
    fn trend_used(&self, trend: f64, pending: Option<f64>) -> f64 {
        let skip = if pending.is_some() {
            (self.slopes.len() + 1).saturating_sub(CONFIRM)
        } else {
            0
        };
        let kept = self.slopes.iter().skip(skip).copied();
        confirmed_trend(trend, kept.chain(pending))
    }

    /// Feeds bucket `self.next` (`None`: a gap, the state coasts); returns the one-step error.
    fn update(&mut self, y: Option<f64>) -> Option<f64> {
        let Params { gamma, phi, .. } = self.params;
        let error = match y.map(|y| y / self.scale).filter(|y| y.is_finite()) {
            Some(y) => {
                let s = self.season_at(self.next);
                let pred = self.level + phi * self.trend_used(self.trend, None) + s;
                let (level, trend) = self.smoothed(y);
                self.level = level;
                self.trend = trend;
                if !self.season.is_empty() {
                    let i = self.next.rem_euclid(self.season.len() as i64) as usize;
                    self.season[i] = gamma * (y - level) + (1.0 - gamma) * s;
                }
                if let Some(last) = self.last_plain {
                    self.slopes.push_back(y - s - last);
                    while self.slopes.len() > CONFIRM {
                        self.slopes.pop_front();
                    }
                }
                self.last_plain = Some(y - s);
                Some(y - pred)
            }
            None => {
                self.level += phi * self.trend;
                self.trend *= phi;
                self.last_plain = None;
                self.slopes.clear();
                None
            }
        };
        self.next += 1;
        error
    }

    /// Feeds the completed bucket `self.next` (series' units; `None`: a gap) and keeps its error
    /// in the sliding window the headroom is taken from, so a surprise raises the headroom at
    /// once rather than at the next refit. Returns whether the bucket was a surprise: its
    /// relative error above both the `p` quantile of the errors before it and [`SURPRISE`].
    fn observe_bucket(&mut self, y: Option<f64>, p: f64) -> bool {
        let (surprise, under_forecast) = self.observe_error(y, p);
        // The share follows the recent under-forecasts; a bucket the model did not
        // under-forecast (a value at or below its prediction, or a gap) may hold it where it
        // was, as far as the recent sizes of the errors either way still call for it (the lag
        // after a burst), but never raise it.
        let under = self.recent_ratio(under_part, self.recent_sum);
        self.share = if under_forecast {
            under
        } else {
            under.max(self.share.min(self.recent_ratio(f32::abs, self.size_sum)))
        };
        surprise
    }

    /// [`Fitted::observe_bucket`]'s error bookkeeping: returns whether the bucket was a surprise
    /// and whether its value was above its prediction.
    fn observe_error(&mut self, y: Option<f64>, p: f64) -> (bool, bool) {
        let e = self.update(y);
        let plain = e.and(self.last_plain);
        let (bursts, shifts) = self.shifts.next(plain);
        for burst in bursts {
            self.admit(burst);
        }
        for shift in shifts {
            // A level shift stays 0 only as rarely as the quantile could not have supported
            // it: one run of them per `1 / (1 − p)` buckets. Where shifts are the series'
            // habit (a jump every few minutes) they are errors the model makes again.
            let spacing = (1.0 / (1.0 - p).max(1e-6)).ceil() as u64;
            let rare = self.last_shift.is_none_or(|l| {
                let since = shift.seq.saturating_sub(l);
                since <= CONFIRM as u64 || since >= spacing
            });
            if rare {
                self.last_shift = Some(shift.seq);
            } else {
                self.admit(shift);
            }
        }
        let (Some(e), Some(y)) = (e, y.map(|y| y / self.scale)) else {
            return (false, false);
        };
        let r = relative_error(e, y) as f32;
        if !r.is_finite() {
            return (false, false);
        }
        // A surprise either way refits (a fall is a new regime too), but only a value above
        // its prediction is an error the upper bound must cover: an over-forecast enters the
        // window as a negative error, which the quantile counts as 0.
        let surprise = f64::from(r) > SURPRISE.max(self.error_quantile(p));
        let under_forecast = e > 0.0;
        let mut counted = if under_forecast { r } else { -r };
        if let (false, true, Some(value)) = (under_forecast, f64::from(r) > SURPRISE, plain) {
            self.fall = Some((self.seen, value, value - e));
        }
        // A value above its prediction but, within [`CONFIRM`] buckets of a fall, nearer the
        // fall's value than what the fall missed is the fall ending (the trend extrapolated past
        // the new level), not demand the upper bound missed: it counts 0.
        let fall_ends = self.fall.zip(plain).is_some_and(|((seq, low, high), y)| {
            under_forecast
                && self.seen - seq <= CONFIRM as u64
                && (y - low).abs() < (y - high).abs()
        });
        if fall_ends {
            counted = 0.0;
        } else if let (true, true, Some(value)) = (surprise, under_forecast, plain) {
            // Counted as 0 until it is known to be a burst (see [`Shifts`]).
            counted = 0.0;
            let shift = Shift {
                seq: self.seen,
                error: r,
                value,
                predicted: value - e,
                held: 0,
            };
            if let Some(old) = self.shifts.surprise(shift) {
                self.admit(old);
            }
        }
        self.seen += 1;
        self.push_error(counted);
        (surprise, under_forecast)
    }

    /// Adds a signed relative error to the sliding window (the oldest leaves a full one); the
    /// quantile's sorted errors get its under-forecast part.
    fn push_error(&mut self, signed: f32) {
        self.recent.push_back(signed);
        let r = under_part(signed);
        self.recent_sum += f64::from(r);
        self.size_sum += f64::from(signed.abs());
        let at = self.rel_errors.partition_point(|x| x.total_cmp(&r).is_lt());
        self.rel_errors.insert(at, r);
        while self.recent.len() > self.window.max(1) {
            if let Some(signed) = self.recent.pop_front() {
                let old = under_part(signed);
                self.recent_sum -= f64::from(old);
                self.size_sum -= f64::from(signed.abs());
                let at = self
                    .rel_errors
                    .partition_point(|x| x.total_cmp(&old).is_lt());
                if at < self.rel_errors.len() {
                    self.rel_errors.remove(at);
                }
            }
        }
    }

    /// Puts a burst's error, counted as 0 while it waited, into the window (if still there).
    fn admit(&mut self, burst: Shift) {
        let oldest = self.seen - self.recent.len() as u64;
        let Some(slot) = burst
            .seq
            .checked_sub(oldest)
            .and_then(|k| usize::try_from(k).ok())
            .and_then(|k| self.recent.get_mut(k))
        else {
            return;
        };
        let r = burst.error;
        *slot = r;
        self.recent_sum += f64::from(r);
        self.size_sum += f64::from(r);
        let zero = self
            .rel_errors
            .partition_point(|x| x.total_cmp(&0.0).is_lt());
        if zero < self.rel_errors.len() {
            self.rel_errors.remove(zero);
        }
        let at = self.rel_errors.partition_point(|x| x.total_cmp(&r).is_lt());
        self.rel_errors.insert(at, r);
    }

    /// Point forecast `h ≥ 1` buckets after the last one fed, in the series' units.
    pub fn predict(&self, h: usize) -> f64 {
        self.extrapolate(self.level, self.trend_used(self.trend, None), self.next, h)
    }

    /// Point forecast `h ≥ 1` buckets after bucket `self.next`, whose values so far average
    /// `partial` (series' units): the state is smoothed with it provisionally, so a forecast made
    /// inside a bucket uses what that bucket has shown already instead of lagging a bucket
    /// behind. Nothing is kept: the bucket updates the state once, when it completes.
    pub fn predict_within(&self, partial: f64, h: usize) -> f64 {
        let y = partial / self.scale;
        let (level, trend) = self.smoothed(y);
        let change = self
            .last_plain
            .map(|last| y - self.season_at(self.next) - last);
        let trend = match change {
            Some(d) => self.trend_used(trend, Some(d)),
            // No value before this bucket: nothing confirms a trend yet.
            None => 0.0,
        };
        self.extrapolate(level, trend, self.next + 1, h)
    }

    /// `level` and the (confirmed) `trend` as of the start of bucket `next`, extrapolated
    /// `h ≥ 1` buckets.
    fn extrapolate(&self, level: f64, trend: f64, next: i64, h: usize) -> f64 {
        let phi = self.params.phi;
        let mut damp = 0.0;
        let mut p = 1.0;
        for _ in 0..h.min(100_000) {
            p *= phi;
            damp += p;
        }
        (level + damp * trend + self.season_at(next + h as i64 - 1)) * self.scale
    }

    /// Headroom over a forecast of `point`: the `p` quantile of the relative errors, scaled
    /// by [`Fitted::recency`], times `max(point, REL_FLOOR × the history's peak)`, in the
    /// series' units.
    pub fn headroom(&self, point: f64, p: f64) -> f64 {
        self.error_quantile(p) * self.recency(p) * point.max(REL_FLOOR * self.scale)
    }

    /// The share of the `p` quantile the headroom takes, in [0, 1]. The quantile is trusted in
    /// proportion to the errors behind it: `t = min(1, n · (1 − p))`, the number of the window's
    /// `n` errors expected beyond it (at 99.9 %, full trust from 1,000 errors on). Below that
    /// the quantile is the window's largest error or close to it, one surprise (the step of a
    /// new workload, say) that would otherwise set the headroom for a whole history; there the
    /// rest follows the recent errors, and the factor is `g + (1 − g) · t`. At a bucket the
    /// model under-forecast `g = min(1, mean of the last RECENT under-forecasts / their window
    /// mean)`; at any other bucket `g` is at most what it was, held only as far as the same
    /// ratio of the errors' sizes either way calls for (the model still off, as after a burst),
    /// and at least the under-forecasts' ratio. So a young history's headroom decays as soon as
    /// the model predicts well again, a burst raises it at once, and a value below its forecast
    /// (a fall, a step down) never raises it.
    pub fn recency(&self, p: f64) -> f64 {
        let n = self.recent.len();
        let g = self.share.clamp(0.0, 1.0);
        let trust = (n as f64 * (1.0 - p.clamp(0.0, 1.0))).clamp(0.0, 1.0);
        g + (1.0 - g) * trust
    }

    /// `min(1, mean of the last RECENT errors / the window's mean)` of the errors' `part`, whose
    /// window sum is `sum`; 1 while there are too few errors or the mean is 0.
    fn recent_ratio(&self, part: fn(f32) -> f32, sum: f64) -> f64 {
        let n = self.recent.len();
        let mean = sum / n.max(1) as f64;
        if n < RECENT || mean.is_nan() || mean <= f64::EPSILON {
            return 1.0;
        }
        let last: f64 = self
            .recent
            .iter()
            .rev()
            .take(RECENT)
            .map(|r| f64::from(part(*r)))
            .sum();
        (last / RECENT as f64 / mean).clamp(0.0, 1.0)
    }

    /// Root-mean-square one-step error, in the series' units.
    pub fn sigma(&self) -> f64 {
        self.sigma * self.scale
    }

    /// The `p` quantile of the relative one-step errors over the fitted history (0 without
    /// errors). Empirical, so heavy tails (bursts, the knees of a ramp) count as often as they
    /// happened instead of as a normal distribution would have them; relative, because demand
    /// errors grow with the level (a quiet night needs less headroom than the peak).
    pub fn error_quantile(&self, p: f64) -> f64 {
        quantile(&self.rel_errors, p)
    }
}

/// The `p` quantile of `sorted` (ascending; 0 when empty).
fn quantile(sorted: &[f32], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    let i = ((p.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n) - 1;
    f64::from(sorted[i])
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The initial state for one parameter set, or `None` when the series is too short.
fn initial(series: &[Option<f64>], first: i64, season: usize, params: Params) -> Option<Fitted> {
    let known = |range: std::ops::Range<usize>| series[range].iter().flatten().copied();
    let (level, trend, offsets) = if season > 0 {
        let c1 = mean(known(0..season))?;
        let c2 = mean(known(season..2 * season))?;
        let mut offsets = vec![0.0; season];
        for (i, o) in offsets.iter_mut().enumerate() {
            let devs = [
                series[i].map(|y| y - c1),
                series[i + season].map(|y| y - c2),
            ];
            *o = mean(devs.into_iter().flatten()).unwrap_or(0.0);
        }
        // The state starts at bucket `first`, with the level of the first cycle.
        (c1, (c2 - c1) / season as f64, offsets)
    } else {
        let y0 = series.iter().flatten().next().copied()?;
        (y0, 0.0, Vec::new())
    };
    let mut offsets_abs = vec![0.0; offsets.len()];
    for (i, o) in offsets.into_iter().enumerate() {
        // Index offsets by absolute bucket number.
        let abs = (first + i as i64).rem_euclid(season.max(1) as i64) as usize;
        offsets_abs[abs] = o;
    }
    Some(Fitted {
        kind: if season > 0 {
            ModelKind::HoltWinters
        } else {
            ModelKind::Trend
        },
        params,
        level,
        trend,
        season: offsets_abs,
        next: first,
        sigma: 0.0,
        rel_errors: Vec::new(),
        recent: VecDeque::new(),
        window: series.len(),
        recent_sum: 0.0,
        size_sum: 0.0,
        share: 1.0,
        last_plain: None,
        slopes: VecDeque::with_capacity(CONFIRM + 1),
        scale: 1.0,
        seen: 0,
        shifts: Shifts::default(),
        last_shift: None,
        fall: None,
    })
}

/// Fits `kind` to `series`, whose first element is absolute bucket `first` (`None` marks a gap).
/// Holt-Winters needs two seasons of data and falls back to Trend otherwise; Trend needs one
/// known value. Deterministic: the same series gives the same model.
pub fn fit(
    series: &[Option<f64>],
    first: i64,
    kind: ModelKind,
    season: usize,
    confidence: f64,
) -> Option<Fitted> {
    let peak = series
        .iter()
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let scale = if peak > 0.0 { peak } else { 1.0 };
    let scaled: Vec<Option<f64>> = series
        .iter()
        .map(|v| v.filter(|v| v.is_finite()).map(|v| v / scale))
        .collect();
    let seasonal = kind == ModelKind::HoltWinters
        && season > 1
        && scaled.len() >= 2 * season
        && scaled[..season].iter().flatten().next().is_some()
        && scaled[season..2 * season].iter().flatten().next().is_some();
    let season = if seasonal { season } else { 0 };
    let warm = if seasonal { season } else { 1 };
    let (params, sigma) = memo::best_params(&scaled, first, season)?.0;
    // The chosen model's own one-step errors, replayed once through the code a running model
    // feeds each bucket to, give the empirical quantiles (the level shifts among them as a
    // running model tells them: see [`Shifts`]). The window is sized once for the whole history
    // (no doubling slack: it is the bulk of the state).
    let mut m = initial(&scaled, first, season, params)?;
    m.recent.reserve_exact(m.window + 1);
    m.rel_errors = Vec::with_capacity(m.window + 1);
    for (i, y) in scaled.iter().enumerate() {
        if i < warm {
            m.update(*y);
        } else {
            m.observe_bucket(*y, confidence);
        }
    }
    m.sigma = sigma;
    m.scale = scale;
    Some(m)
}

/// The grid's parameter set with the least mean squared one-step error on `scaled` (the
/// series divided by its peak, starting at bucket `first`; `season` 0 for no season), scored
/// after the initialisation window (the first season, or the first value), and its RMS error.
/// The most responsive level first, the least trend and the strongest damping first: where the
/// history cannot tell parameters apart (a flat series scores 0 with every one) the fit is the
/// naive forecast, the last value, and not a level that takes an hour to follow a step. A later
/// set wins only by more than the [`TIE`] margin. With `bound`, a set is dropped as soon as the
/// squared errors so far, which only grow, already reach the score it must beat: the same
/// winner as scoring every set whole (branch and bound), found sooner.
fn best_params(
    scaled: &[Option<f64>],
    first: i64,
    season: usize,
    bound: bool,
) -> Option<(Params, f64)> {
    let gammas: &[f64] = if season > 0 { &GAMMAS } else { &[0.0] };
    let warm = if season > 0 { season } else { 1 };
    // Every parameter set scores the same buckets: those after `warm` with a value.
    let scored = scaled.iter().skip(warm).flatten().count();
    let mut best: Option<(f64, Params, f64)> = None;
    for &alpha in ALPHAS.iter().rev() {
        for &beta in &BETAS {
            for &gamma in gammas {
                for &phi in &PHIS {
                    let params = Params {
                        alpha,
                        beta,
                        gamma,
                        phi,
                    };
                    let mut m = initial(scaled, first, season, params)?;
                    let bar = best
                        .as_ref()
                        .map(|(b, ..)| *b)
                        .filter(|b| bound && b.is_finite())
                        .map(|b| b - TIE * b.abs());
                    let (mut sse, mut n) = (0.0, 0usize);
                    let mut beaten = false;
                    for (i, y) in scaled.iter().enumerate() {
                        if let Some(e) = m.update(*y)
                            && i >= warm
                        {
                            sse += e * e;
                            n += 1;
                            if n % BOUND_EVERY == 0
                                && bar.is_some_and(|bar| sse / scored as f64 >= bar)
                            {
                                beaten = true;
                                break;
                            }
                        }
                    }
                    if beaten {
                        continue;
                    }
                    let sigma = if n > 0 { (sse / n as f64).sqrt() } else { 0.0 };
                    let score = if n > 0 { sse / n as f64 } else { 0.0 };
                    if score.is_finite()
                        && best
                            .as_ref()
                            .is_none_or(|(b, ..)| !b.is_finite() || score < *b - TIE * b.abs())
                    {
                        best = Some((score, params, sigma));
                    } else if best.is_none() {
                        best = Some((f64::INFINITY, params, sigma));
                    }
                }
            }
        }
    }
    best.map(|(_, params, sigma)| (params, sigma))
}

/// A process-wide memo of the grid search ([`best_params`]), by content: the same history gives
/// the same smoothing factors, so a fit whose buckets were already searched (another policy
/// forecasting the same query, the other policy of a `backtest --compare`, or the next replay of
/// a benchmark's sweep, since a forecaster's fits depend on the metric alone) costs one pass over
/// the history instead of one per parameter set. Results are identical with or without it.
///
/// Key: the SHA-256 of the scaled series' bits, its first bucket and the season. Memory is
/// bounded: two generations of at most [`memo::GENERATION`] entries (about 100 bytes each); when
/// the newer fills it replaces the older, so what was used in the last generation stays.
mod memo {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex, PoisonError};

    use super::Params;

    /// Entries in one generation.
    pub(super) const GENERATION: usize = 32_768;

    type Key = [u8; 32];
    type Found = (Params, f64);

    /// At most `2 · GENERATION` entries: the newer generation, and the older one it replaced.
    #[derive(Default)]
    pub(super) struct Generations {
        newer: HashMap<Key, Found>,
        older: HashMap<Key, Found>,
    }

    impl Generations {
        /// The entry for `key`; one found in the older generation moves to the newer.
        fn get(&mut self, key: &Key) -> Option<Found> {
            if let Some(found) = self.newer.get(key) {
                return Some(*found);
            }
            let found = self.older.remove(key)?;
            self.insert(*key, found);
            Some(found)
        }

        /// Adds an entry; a full newer generation first replaces the older.
        pub(super) fn insert(&mut self, key: Key, found: Found) {
            if self.newer.len() >= GENERATION {
                self.older = std::mem::take(&mut self.newer);
            }
            self.newer.insert(key, found);
        }

        /// The entries held.
        #[cfg(test)]
        pub(super) fn len(&self) -> usize {
            self.newer.len() + self.older.len()
        }
    }

    static MEMO: LazyLock<Mutex<Generations>> = LazyLock::new(Mutex::default);

    fn key(scaled: &[Option<f64>], first: i64, season: usize) -> Key {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&first.to_le_bytes());
        ctx.update(&(season as u64).to_le_bytes());
        ctx.update(&(scaled.len() as u64).to_le_bytes());
        for v in scaled {
            match v {
                Some(v) => {
                    ctx.update(&[1]);
                    ctx.update(&v.to_bits().to_le_bytes());
                }
                None => ctx.update(&[0]),
            }
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// [`super::best_params`] (bounded), and whether the memo already held it.
    pub(super) fn best_params(
        scaled: &[Option<f64>],
        first: i64,
        season: usize,
    ) -> Option<(Found, bool)> {
        let key = key(scaled, first, season);
        // A panic elsewhere while the lock was held cannot leave an entry half-written (each is
        // one insert of a finished value), so a poisoned memo is still sound.
        let held = MEMO
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key);
        if let Some(found) = held {
            return Some((found, true));
        }
        // The search runs outside the lock: two fits of the same history at once both search.
        let found = super::best_params(scaled, first, season, true)?;
        MEMO.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, found);
        Some((found, false))
    }
}

/// The under-forecast part of a signed relative error: itself if positive, else +0 (never -0,
/// which the sorted errors' `total_cmp` would order apart from 0).
fn under_part(signed: f32) -> f32 {
    if signed > 0.0 { signed } else { 0.0 }
}

/// The size of a one-step error `e` of the value `y` (both scaled) relative to the prediction
/// `y - e`, either way.
fn relative_error(e: f64, y: f64) -> f64 {
    e.abs() / (y - e).max(REL_FLOOR)
}

/// One metric's history and model.
#[derive(Debug, Clone)]
pub struct Forecaster {
    settings: ForecastSettings,
    /// Completed buckets' means, the last one being bucket `last`; NaN marks a gap (8 bytes a
    /// bucket instead of an `Option`'s 16).
    buckets: VecDeque<f64>,
    last: Option<i64>,
    /// The bucket being filled: (number, sum, count).
    current: Option<(i64, f64, u32)>,
    fitted: Option<Fitted>,
    /// The bucket the scheduled fit of `fitted` ended at (see [`Forecaster::anchor`]).
    anchor: Option<i64>,
    /// The bucket of the last refit a surprise made since that scheduled fit: the next one
    /// waits [`ForecastSettings::surprise_refit_gap`] buckets after it.
    surprise_fit: Option<i64>,
    /// The least headroom, in the series' units.
    floor: f64,
}

impl Forecaster {
    /// An empty forecaster. `target` is the metric's target in its own units (the per-replica
    /// value of an `AverageValue` target): the headroom is never below
    /// `settings.min_headroom × target`, so with an `AverageValue` target `min_headroom` is
    /// spare capacity in replicas.
    pub fn new(settings: ForecastSettings, target: f64) -> Forecaster {
        let floor = settings.min_headroom * target;
        Forecaster::empty(
            settings,
            if floor.is_finite() {
                floor.max(0.0)
            } else {
                0.0
            },
        )
    }

    /// No history, no model.
    fn empty(settings: ForecastSettings, floor: f64) -> Forecaster {
        Forecaster {
            settings,
            buckets: VecDeque::new(),
            last: None,
            current: None,
            fitted: None,
            anchor: None,
            surprise_fit: None,
            floor,
        }
    }

    /// Records the metric's value at `t`. Non-finite values and times before the bucket being
    /// filled are ignored.
    pub fn observe(&mut self, t: DateTime<Utc>, value: f64) {
        if !value.is_finite() {
            return;
        }
        let b = self.settings.bucket_of(t);
        match self.current {
            Some((cb, sum, n)) if cb == b => self.current = Some((cb, sum + value, n + 1)),
            Some((cb, _, _)) if b < cb => {}
            _ => {
                self.close_before(b);
                self.current = Some((b, value, 1));
            }
        }
    }

    /// Completes every bucket before bucket `b` (gaps as `None`).
    fn close_before(&mut self, b: i64) {
        if let Some((cb, sum, n)) = self.current
            && cb < b
        {
            self.current = None;
            self.push(cb, Some(sum / f64::from(n.max(1))));
        }
        if let Some(last) = self.last {
            // A gap longer than the history only needs the history's worth of `None`s.
            let from = (last + 1).max(b - self.settings.held_buckets() as i64);
            if from > last + 1 {
                self.buckets.clear();
                self.fitted = None;
                self.last = Some(from - 1);
            }
            for g in from..b {
                self.push(g, None);
            }
        }
    }

    fn push(&mut self, b: i64, value: Option<f64>) {
        if self.last.is_some_and(|l| b <= l) {
            return;
        }
        if self.buckets.len() == self.buckets.capacity() {
            // The history is kept whole: size it once instead of doubling past it.
            let room = (self.settings.held_buckets() + 1).saturating_sub(self.buckets.len());
            self.buckets.reserve_exact(room.max(1));
        }
        self.buckets.push_back(value.unwrap_or(f64::NAN));
        self.last = Some(b);
        while self.buckets.len() > self.settings.held_buckets() {
            self.buckets.pop_front();
        }
        self.advance(b, value);
    }

    /// Moves the model over the completed bucket `b` (already in the history) when it expects
    /// that bucket; a surprise refits it on the history up to `b`, so a new regime (a step,
    /// the end of a ramp) gets parameters that follow it at once instead of at the next
    /// scheduled fit, and its headroom is the new model's errors, not the lag of the old one.
    /// Surprises within [`ForecastSettings::surprise_refit_gap`] buckets of the last refit one
    /// made only update the model (their errors still enter the headroom as any bucket's do).
    /// The gap counts from the scheduled fit's replay on, so it is a function of the history
    /// alone, as the forecast is.
    fn advance(&mut self, b: i64, value: Option<f64>) {
        let p = self.settings.confidence;
        let surprise = match self.fitted.as_mut() {
            Some(f) if f.next == b => f.observe_bucket(value, p),
            _ => return,
        };
        let gap = self.settings.surprise_refit_gap();
        if surprise && self.surprise_fit.is_none_or(|last| b - last >= gap) {
            self.fitted = self.fit_ending(b);
            self.surprise_fit = Some(b);
        }
    }

    /// The model fitted on the history's worth of buckets up to bucket `end` (fewer in a
    /// younger history).
    fn fit_ending(&self, end: i64) -> Option<Fitted> {
        let last = self.last?;
        let front = last + 1 - self.buckets.len() as i64;
        let first = front.max(end + 1 - self.settings.history_buckets() as i64);
        let series: Vec<Option<f64>> = self
            .buckets
            .range(usize::try_from(first - front).ok()?..usize::try_from(end + 1 - front).ok()?)
            .map(|v| v.is_finite().then_some(*v))
            .collect();
        let s = &self.settings;
        fit(&series, first, s.model, s.season_buckets(), s.confidence)
    }

    /// The bucket the model in use was last fitted up to on schedule, given the last completed
    /// bucket `last`: the last bucket before a multiple of `refit` in absolute time, or in a
    /// history younger than a fit's window the last bucket at which it had doubled (so a young
    /// history's first fit, on a bucket or two, is not kept for hours). A function of the
    /// history alone, not of when this forecaster started: the controller after a restart,
    /// `dry-run` and the backtest fit on the same buckets, replay the same ones since, and so
    /// forecast alike.
    fn anchor(&self, last: i64) -> i64 {
        let refit = self.settings.refit_buckets() as i64;
        let scheduled = last - (last + 1).rem_euclid(refit);
        let front = last + 1 - self.buckets.len() as i64;
        let young = self
            .buckets
            .iter()
            .position(|v| v.is_finite())
            .map(|k| front + k as i64)
            .and_then(|first| {
                let age = last - first + 1;
                let doubled = 1i64 << (63 - age.max(1).leading_zeros());
                (doubled <= self.settings.history_buckets() as i64).then_some(first + doubled - 1)
            });
        young.map_or(scheduled, |y| y.max(scheduled))
    }

    /// Fits the model at `anchor` and replays the completed buckets since, surprises included.
    fn refit_at(&mut self, anchor: i64, last: i64) {
        self.fitted = self.fit_ending(anchor);
        self.anchor = Some(anchor);
        self.surprise_fit = None;
        let front = last + 1 - self.buckets.len() as i64;
        for b in anchor + 1..=last {
            let Some(v) = usize::try_from(b - front)
                .ok()
                .and_then(|k| self.buckets.get(k).copied())
            else {
                continue;
            };
            self.advance(b, v.is_finite().then_some(v));
        }
    }

    /// Replaces the history with `points` (a `query_range` result, in time order) while keeping
    /// what this forecaster saw that they lack: a bucket the points leave empty keeps this
    /// forecaster's value, and buckets after the points' last are kept whole. So live samples
    /// observed before a late history read are not thrown away; where both have a bucket the
    /// points win (they are the same query's recorded values). The model is refitted at the
    /// next forecast.
    pub fn reload(&mut self, points: impl IntoIterator<Item = (DateTime<Utc>, f64)>) {
        let mut read = self.emptied();
        for (t, v) in points {
            read.observe(t, v);
        }
        if self.last.is_none() && self.current.is_none() {
            // Nothing seen yet (the read after a start): the read is the whole history.
            *self = read;
            return;
        }
        // Bucket -> (sum, count, still being filled).
        let mut merged: BTreeMap<i64, (f64, u32, bool)> = BTreeMap::new();
        for source in [&*self, &read] {
            merged.extend(source.known_buckets());
        }
        let mut out = self.emptied();
        for (b, (sum, n, filling)) in merged {
            out.close_before(b);
            if filling {
                out.current = Some((b, sum, n));
            } else {
                out.push(b, Some(sum / f64::from(n.max(1))));
            }
        }
        *self = out;
    }

    /// The same settings with no history.
    fn emptied(&self) -> Forecaster {
        Forecaster::empty(self.settings, self.floor)
    }

    /// Every bucket with a value: (bucket, (sum, count, still being filled)).
    fn known_buckets(&self) -> impl Iterator<Item = (i64, (f64, u32, bool))> + '_ {
        let first = self.last.map_or(0, |l| l + 1 - self.buckets.len() as i64);
        let completed = self
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(move |(k, v)| (first + k as i64, (*v, 1, false)));
        completed.chain(self.current.map(|(b, sum, n)| (b, (sum, n, true))))
    }

    /// The forecast for `now + horizon`, refitting first at a new scheduled fit point
    /// ([`Forecaster::anchor`]). `None` while there is no history.
    pub fn forecast(&mut self, now: DateTime<Utc>) -> Option<Prediction> {
        let s = self.settings;
        let b_now = s.bucket_of(now);
        self.close_before(b_now);
        let last = self.last?;
        let anchor = self.anchor(last);
        if self.anchor != Some(anchor) || self.fitted.as_ref().is_none_or(|f| f.next != last + 1) {
            self.refit_at(anchor, last);
        }
        let f = self.fitted.as_ref()?;
        let target = s.bucket_of(now + s.horizon);
        // Forecast from inside the current bucket when it has values and the state is at it.
        let (point, h) = match self.current {
            Some((b, sum, n)) if n > 0 && f.next == b => {
                let h = (target - b).max(1) as usize;
                (f.predict_within(sum / f64::from(n), h), h)
            }
            _ => {
                let h = (target - last).max(1) as usize;
                (f.predict(h), h)
            }
        };
        let learned = f.headroom(point, s.confidence) * (h as f64).sqrt();
        let upper = (point + learned.max(self.floor)).max(0.0);
        (point.is_finite() && upper.is_finite()).then_some(Prediction {
            point,
            upper,
            model: f.kind,
            horizon: s.horizon,
        })
    }
}

/// The forecasters of a policy: one per Prometheus metric when the policy has `spec.forecast`.
#[derive(Debug, Clone, Default)]
pub struct ForecastState {
    metrics: Vec<Option<Forecaster>>,
}

impl ForecastState {
    /// Forecasters for `policy`'s Prometheus metrics (none without `spec.forecast`).
    pub fn new(policy: &super::CompiledPolicy) -> ForecastState {
        ForecastState {
            metrics: policy
                .metrics
                .iter()
                .map(|m| match (&policy.forecast, &m.source) {
                    (Some(s), super::MetricSource::Prometheus { .. }) => {
                        Some(Forecaster::new(*s, m.target.value()))
                    }
                    _ => None,
                })
                .collect(),
        }
    }

    /// Whether any metric is forecast.
    pub fn is_active(&self) -> bool {
        self.metrics.iter().any(Option::is_some)
    }

    /// Feeds metric `i`'s history (for example a `query_range` result after a restart).
    pub fn observe_metric(&mut self, i: usize, t: DateTime<Utc>, value: f64) {
        if let Some(Some(f)) = self.metrics.get_mut(i) {
            f.observe(t, value);
        }
    }

    /// Loads metric `i`'s history (a `query_range` result, in time order) into a state that may
    /// already hold live samples: see [`Forecaster::reload`].
    pub fn load_history(
        &mut self,
        i: usize,
        points: impl IntoIterator<Item = (DateTime<Utc>, f64)>,
    ) {
        if let Some(Some(f)) = self.metrics.get_mut(i) {
            f.reload(points);
        }
    }

    /// The metrics that are forecast (their indices in spec order).
    pub fn forecast_metrics(&self) -> impl Iterator<Item = usize> + '_ {
        self.metrics
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|_| i))
    }

    /// Feeds this evaluation's samples (valid `Series` only, summed as the evaluator sums them)
    /// and returns each metric's forecast, in spec order.
    pub fn observe_and_forecast(
        &mut self,
        samples: &[Sample],
        now: DateTime<Utc>,
    ) -> Vec<Option<Prediction>> {
        self.metrics
            .iter_mut()
            .enumerate()
            .map(|(i, f)| {
                let f = f.as_mut()?;
                if let Some(Sample::Series { values, .. }) = samples.get(i)
                    && !values.is_empty()
                    && values.iter().all(|v| v.is_finite())
                {
                    f.observe(now, values.iter().sum());
                }
                f.forecast(now)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings(model: ModelKind) -> ForecastSettings {
        ForecastSettings {
            model,
            season: TimeDelta::hours(24),
            horizon: TimeDelta::seconds(60),
            history: TimeDelta::days(14),
            step: TimeDelta::minutes(5),
            refit: TimeDelta::hours(1),
            confidence: 0.95,
            min_headroom: 0.0,
        }
    }

    fn some(v: impl IntoIterator<Item = f64>) -> Vec<Option<f64>> {
        v.into_iter().map(Some).collect()
    }

    #[test]
    fn sine_is_forecast_a_season_ahead_by_holt_winters() {
        let m = 48;
        let y = |i: usize| 100.0 + 30.0 * (2.0 * std::f64::consts::PI * i as f64 / m as f64).sin();
        let series = some((0..m * 6).map(y));
        let f = fit(&series, 0, ModelKind::HoltWinters, m, 0.95).expect("fits");
        assert_eq!(f.kind, ModelKind::HoltWinters);
        for h in [1, 5, 12, 24, 47] {
            let want = y(m * 6 + h - 1);
            let got = f.predict(h);
            assert!((got - want).abs() < 1.0, "h={h}: {got} vs {want}");
        }
        assert!(f.sigma() < 1.0, "sigma {}", f.sigma());
    }

    #[test]
    fn ramp_is_extrapolated_by_the_trend_model() {
        let series = some((0..200).map(|i| 10.0 + 2.0 * i as f64));
        let f = fit(&series, 0, ModelKind::Trend, 0, 0.95).expect("fits");
        // The next value is 410; damping makes longer horizons fall short a little, never over.
        let one = f.predict(1);
        assert!((one - 410.0).abs() < 2.0, "{one}");
        let ten = f.predict(10);
        assert!(ten > 420.0 && ten <= 428.5, "{ten}");
    }

    #[test]
    fn step_is_followed_after_a_few_buckets() {
        let series = some((0..100).map(|i| if i < 60 { 10.0 } else { 50.0 }));
        let f = fit(&series, 0, ModelKind::Trend, 0, 0.95).expect("fits");
        let p = f.predict(1);
        assert!((p - 50.0).abs() < 2.0, "{p}");
    }

    #[test]
    fn headroom_is_the_empirical_quantile_of_the_errors() {
        // A flat series with one burst two buckets before its end: the largest error is the
        // burst (200 over a forecast of 100: 2.0 relative), the median is nothing.
        let series = some((0..200).map(|i| if i == 197 { 300.0 } else { 100.0 }));
        let f = fit(&series, 0, ModelKind::Trend, 0, 0.95).expect("fits");
        assert!(
            (f.error_quantile(1.0) - 2.0).abs() < 0.01,
            "{}",
            f.error_quantile(1.0)
        );
        assert!(f.error_quantile(0.5) < 0.01, "{}", f.error_quantile(0.5));
        // The burst is among the last three errors: the headroom is the quantile in full.
        assert_eq!(f.recency(1.0), 1.0);
        // Headroom scales with the level, but not below 20 % of the peak (300).
        assert!((f.headroom(100.0, 1.0) - 200.0).abs() < 2.0);
        assert!((f.headroom(1.0, 1.0) - 120.0).abs() < 2.0);
    }

    /// The same burst a hundred buckets back, with every error since then zero: the quantile
    /// still remembers it, but where 199 errors cannot support it (at 100 %, or in part at
    /// 99.9 %) the headroom has all but decayed (the model has predicted every bucket since
    /// almost exactly); at 99 % they can, and it keeps it; where the recent errors are as large
    /// as usual, it has not decayed either.
    #[test]
    fn headroom_decays_with_the_recent_errors() {
        let calm = some((0..200).map(|i| if i == 100 { 300.0 } else { 100.0 }));
        let f = fit(&calm, 0, ModelKind::Trend, 0, 0.95).expect("fits");
        assert!((f.error_quantile(1.0) - 2.0).abs() < 0.01);
        assert!(f.recency(1.0) < 0.05, "{}", f.recency(1.0));
        assert!(f.headroom(100.0, 1.0) < 10.0, "{}", f.headroom(100.0, 1.0));
        // At 99 %, 199 errors expect about two beyond the quantile: it is trusted in full.
        assert!((f.recency(0.99) - 1.0).abs() < 1e-12, "{}", f.recency(0.99));
        // At 99.9 % a fifth of it is.
        let r = f.recency(0.999);
        assert!(r > 0.19 && r < 0.25, "{r}");
        // Alternating noise of ±10 %: every recent error is as large as the window's mean.
        let noisy = some((0..200).map(|i| if i % 2 == 0 { 90.0 } else { 110.0 }));
        let g = fit(&noisy, 0, ModelKind::Trend, 0, 0.95).expect("fits");
        assert!((g.recency(1.0) - 1.0).abs() < 0.05, "{}", g.recency(1.0));
    }

    #[test]
    fn holt_winters_falls_back_to_trend_under_two_seasons() {
        let series = some((0..30).map(|i| i as f64));
        let f = fit(&series, 0, ModelKind::HoltWinters, 24, 0.95).expect("fits");
        assert_eq!(f.kind, ModelKind::Trend);
    }

    #[test]
    fn empty_history_has_no_forecast() {
        assert!(fit(&[], 0, ModelKind::HoltWinters, 24, 0.95).is_none());
        assert!(fit(&[None, None], 0, ModelKind::Trend, 0, 0.95).is_none());
        let mut f = Forecaster::new(settings(ModelKind::HoltWinters), 1.0);
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).expect("time");
        assert!(f.forecast(t0).is_none());
    }

    /// Fed bucket by bucket, the forecaster predicts a daily sine ahead of time, and the state
    /// updated between refits agrees with a refit.
    #[test]
    fn forecaster_predicts_the_next_bucket_of_a_daily_cycle() {
        let s = ForecastSettings {
            step: TimeDelta::minutes(30),
            horizon: TimeDelta::minutes(30),
            refit: TimeDelta::hours(6),
            ..settings(ModelKind::HoltWinters)
        };
        let y = |t: i64| 100.0 + 40.0 * (2.0 * std::f64::consts::PI * t as f64 / 86_400.0).sin();
        let mut f = Forecaster::new(s, 1.0);
        let t0 = 1_700_006_400i64; // a multiple of 30 minutes
        let mut last = None;
        for k in 0..(5 * 48) {
            let t = t0 + k * 1800;
            let now = DateTime::from_timestamp(t, 0).expect("time");
            f.observe(now, y(t));
            last = f.forecast(now);
        }
        let p = last.expect("a forecast");
        assert_eq!(p.model, ModelKind::HoltWinters);
        let want = y(t0 + 5 * 48 * 1800);
        assert!((p.point - want).abs() < 2.0, "{} vs {want}", p.point);
        assert!(p.upper >= p.point);
    }

    #[test]
    fn forecast_is_sized_for_the_bucket_at_the_horizon() {
        let mut f = Forecaster::new(
            ForecastSettings {
                horizon: TimeDelta::minutes(10),
                ..settings(ModelKind::Trend)
            },
            1.0,
        );
        let t0 = DateTime::from_timestamp(1_700_000_100, 0).expect("time");
        for k in 0..50 {
            f.observe(t0 + TimeDelta::minutes(5 * k), 100.0 + 10.0 * k as f64);
        }
        let now = t0 + TimeDelta::minutes(5 * 49);
        let p = f.forecast(now).expect("forecast");
        // The current bucket holds 590 (k = 49); now + 10m is two buckets on: about 610.
        assert!(p.point > 600.0 && p.point < 615.0, "{}", p.point);
    }

    /// A forecast made inside a bucket uses the value that bucket has shown so far: the same
    /// history with a different value in the current bucket forecasts differently, and a ramp
    /// is extrapolated from the current bucket's value.
    #[test]
    fn forecast_inside_a_bucket_uses_its_values_so_far() {
        let s = ForecastSettings {
            step: TimeDelta::minutes(1),
            horizon: TimeDelta::minutes(1),
            ..settings(ModelKind::Trend)
        };
        let t0 = DateTime::from_timestamp(1_700_000_040, 0).expect("time");
        let now = t0 + TimeDelta::minutes(120);
        let forecast_with = |current: f64| {
            let mut f = Forecaster::new(s, 1.0);
            for k in 0..120 {
                f.observe(t0 + TimeDelta::minutes(k), 100.0 + 10.0 * k as f64);
            }
            f.observe(now, current);
            f.forecast(now).expect("forecast")
        };
        let on_ramp = forecast_with(1300.0);
        assert!((on_ramp.point - 1310.0).abs() < 5.0, "{on_ramp:?}");
        let higher = forecast_with(1600.0);
        assert!(
            higher.point > on_ramp.point + 100.0,
            "{higher:?} vs {on_ramp:?}"
        );
    }

    /// `min_headroom` is the least headroom, in targets: a perfectly learned, calm series still
    /// gets it, and a larger learned headroom wins over it.
    #[test]
    fn min_headroom_is_a_floor_in_units_of_the_target() {
        let s = ForecastSettings {
            step: TimeDelta::minutes(1),
            horizon: TimeDelta::minutes(1),
            min_headroom: 0.5,
            ..settings(ModelKind::Trend)
        };
        let mut f = Forecaster::new(s, 100.0);
        let t0 = DateTime::from_timestamp(1_700_000_040, 0).expect("time");
        for k in 0..=120 {
            f.observe(t0 + TimeDelta::minutes(k), 30.0);
        }
        let p = f.forecast(t0 + TimeDelta::minutes(120)).expect("forecast");
        assert!((p.point - 30.0).abs() < 1e-6, "{p:?}");
        assert!((p.upper - 80.0).abs() < 1e-6, "{p:?}");
        // A noisy series learns more headroom than the floor.
        let mut g = Forecaster::new(s, 1.0);
        for k in 0..=120 {
            let v = if k % 2 == 0 { 10.0 } else { 300.0 };
            g.observe(t0 + TimeDelta::minutes(k), v);
        }
        let p = g.forecast(t0 + TimeDelta::minutes(120)).expect("forecast");
        assert!(p.upper - p.point > 0.5, "{p:?}");
    }

    /// A policy forecasting a new metric starts from an empty history: its first fit, on one
    /// bucket, has nothing to choose parameters from (and no errors for headroom). The model is
    /// refitted as the history doubles, not only every `refit` (6h here), so it follows a ramp
    /// within minutes instead of lagging it for hours.
    #[test]
    fn a_young_history_is_refitted_as_it_grows() {
        let mut f = Forecaster::new(
            ForecastSettings {
                history: TimeDelta::days(1),
                step: TimeDelta::minutes(1),
                refit: TimeDelta::hours(6),
                ..settings(ModelKind::Trend)
            },
            1.0,
        );
        let t0 = 1_700_000_040i64; // a multiple of a minute
        let ramp = |t: i64| 100.0 + 10.0 * (t - t0) as f64 / 60.0;
        let mut last = None;
        for k in 0..(30 * 4) {
            let t = t0 + 15 * k;
            let now = DateTime::from_timestamp(t, 0).expect("time");
            f.observe(now, ramp(t));
            last = f.forecast(now);
        }
        // 30 minutes in: the value is about 400 and rising by 10 a minute.
        let p = last.expect("a forecast");
        let now = ramp(t0 + 15 * (30 * 4 - 1));
        assert!(p.point > now, "forecast {} behind the value {now}", p.point);
        assert!(p.upper >= p.point);
    }

    /// A history read late (after a failed read) merges with the live samples seen meanwhile:
    /// the read fills what the live state lacks, the live state keeps what the read lacks (a gap
    /// in it, and the buckets after its end, including the one being filled), and where both
    /// have a bucket the read wins.
    #[test]
    fn a_late_history_read_keeps_the_live_samples() {
        let s = ForecastSettings {
            step: TimeDelta::minutes(1),
            history: TimeDelta::hours(1),
            ..settings(ModelKind::Trend)
        };
        let t0 = DateTime::from_timestamp(1_700_000_040, 0).expect("time");
        let at = |k: i64| t0 + TimeDelta::minutes(k);
        let mut f = Forecaster::new(s, 1.0);
        for k in 30..40 {
            f.observe(at(k), 1000.0 + k as f64);
        }
        f.observe(at(40), 7.0);
        // The recorded history: minutes 0..=35 without minute 33, one lower than live.
        let points: Vec<_> = (0..=35)
            .filter(|k| *k != 33)
            .map(|k| (at(k), 999.0 + k as f64))
            .collect();
        f.reload(points);
        let known: BTreeMap<i64, (f64, u32, bool)> = f.known_buckets().collect();
        let b = |k: i64| s.bucket_of(at(k));
        assert_eq!(known.len(), 41, "{known:?}");
        assert_eq!(known[&b(0)], (999.0, 1, false));
        assert_eq!(known[&b(32)], (1031.0, 1, false), "the read wins");
        assert_eq!(known[&b(33)], (1033.0, 1, false), "a gap in the read");
        assert_eq!(known[&b(39)], (1039.0, 1, false), "after the read");
        assert_eq!(known[&b(40)], (7.0, 1, true), "the bucket being filled");
        f.observe(at(40) + TimeDelta::seconds(15), 9.0);
        assert_eq!(f.current, Some((b(40), 16.0, 2)));
        assert!(f.forecast(at(40) + TimeDelta::seconds(15)).is_some());
    }

    /// The walkthrough's inputs, sampled every 15 s as the controller does: 10 minutes flat at
    /// 50 req/s, a ramp of 70 req/s a minute up to 400, 15 minutes flat at 400, then a fall to a
    /// flat 50. `(minute, value, forecast)` at each evaluation, from the Trend model with the
    /// defaults `spec.forecast: {model: Trend}` compiles to (1m buckets, 1d of history,
    /// confidence 99.9, no `minHeadroom`).
    fn walkthrough() -> Vec<(i64, f64, Option<Prediction>)> {
        let value = |minute: i64| match minute {
            ..10 => 50.0,
            10..15 => 50.0 + 70.0 * (minute - 9) as f64,
            15..30 => 400.0,
            _ => 50.0,
        };
        evaluations(45 * 60, |t| value(t / 60))
            .into_iter()
            .map(|(t, v, p)| (t / 60, v, p))
            .collect()
    }

    /// `value(t)` at every 15 s evaluation over `seconds` (t from 0, a multiple of a minute),
    /// fed to [`trend_defaults`]: `(t, value, forecast)` at each.
    fn evaluations(
        seconds: i64,
        value: impl Fn(i64) -> f64,
    ) -> Vec<(i64, f64, Option<Prediction>)> {
        let mut f = trend_defaults();
        let t0 = 1_700_000_040i64; // a multiple of a minute
        (0..seconds)
            .step_by(15)
            .map(|t| {
                let now = DateTime::from_timestamp(t0 + t, 0).expect("time");
                f.observe(now, value(t));
                (t, value(t), f.forecast(now))
            })
            .collect()
    }

    /// A request rate as Prometheus' `rate(...[1m])` reports it: the mean over the last
    /// minute (here at 5 s resolution) of a demand that changes in steps.
    fn rate_1m(demand: impl Fn(i64) -> f64, t: i64) -> f64 {
        (0..12).map(|i| demand(t - 5 * i)).sum::<f64>() / 12.0
    }

    /// Issue 16, the walkthrough's step DOWN, at the example policy's settings (Trend, 1m
    /// buckets, 1d of history, 99.9 %, 60 s ahead, evaluated every 15 s, 70 req/s a replica):
    /// the walkthrough's ramp from 50 to a flat 400 (see [`walkthrough`]), a step to a flat 800
    /// a quarter of an hour later (a second level shift within the hour, so its error counts in
    /// the headroom: see `frequent_level_shifts_count_in_the_headroom`), and twenty minutes
    /// later a fall from 800 to a flat 400, each step as `rate(...[1m])` shows one:
    /// over a minute, with noise of ±0.5 %. Wherever in the minute the fall starts, the replicas
    /// the upper bound needs never go up after it, and they are the 6 that 400 needs from the
    /// first whole minute's bucket at the new rate on (two minutes after the fall began; the
    /// bucket being filled averages what it has seen, the last of the fall included). (The values below the forecast during the fall used to enter
    /// the headroom as errors as large as those above it: the upper bound read 582, 9
    /// replicas, for four minutes; in the walkthrough 716 then 874, clipped at 10.)
    #[test]
    fn a_step_down_never_raises_the_upper_bound() {
        for offset in [0, 5, 20, 35, 50] {
            let fall = 50 * 60 + offset;
            let demand = |t: i64| match t / 60 {
                ..10 => 50.0,
                m @ 10..15 => 50.0 + 70.0 * (m - 9) as f64,
                15..30 => 400.0,
                _ if t < fall => 800.0,
                _ => 400.0,
            };
            let noise = |t: i64| ((t / 15).wrapping_mul(2_654_435_761) % 1000) as f64 / 1e5;
            let run = evaluations(fall + 20 * 60, |t| rate_1m(demand, t) * (0.995 + noise(t)));
            let mut before = f64::INFINITY;
            for (t, value, p) in run.into_iter().filter(|(t, _, _)| *t >= fall) {
                let p = p.expect("a forecast");
                let (at, replicas) = (t - fall, (p.upper / 70.0).ceil());
                assert!(
                    replicas <= before,
                    "fall at {offset}s into a minute, {at}s after: {value} → {p:?}, up from {before}"
                );
                before = replicas;
                if at >= 120 {
                    assert_eq!(
                        replicas, 6.0,
                        "fall at {offset}s into a minute, {at}s after: {value} → {p:?}"
                    );
                }
            }
        }
    }

    /// A ramp that stops at a flat 400 req/s is a new level, not a lasting trend: within a few
    /// minutes the forecast's upper bound is 400 again, which needs 6 replicas at 70 per replica
    /// (it used to read 750, and in the walkthrough 1238.743 → 18, pinning the target at 10).
    #[test]
    fn a_ramp_that_stops_is_a_new_level_not_a_lasting_trend() {
        let run = walkthrough();
        for (minute, value, p) in &run {
            if (19..30).contains(minute) {
                let p = p.expect("a forecast");
                assert!((p.point - value).abs() < 1.0, "minute {minute}: {p:?}");
                assert!(p.upper <= 420.0, "minute {minute}: {p:?}");
                assert_eq!((p.upper / 70.0).ceil(), 6.0, "minute {minute}: {p:?}");
            }
        }
    }

    /// After traffic falls from 400 to a flat 50 req/s the point forecast is 50 at once (the
    /// fall is not extrapolated into a negative trend), and the headroom the fall taught decays
    /// as soon as the model predicts well again: the upper bound is back near 50 within four
    /// minutes (it used to stay at 184 to 202 for the rest of the history, a whole day).
    #[test]
    fn the_headroom_decays_once_the_errors_shrink() {
        let run = walkthrough();
        for (minute, _, p) in run.iter().filter(|(minute, _, _)| *minute >= 30) {
            let p = p.expect("a forecast");
            assert!((p.point - 50.0).abs() < 1.0, "minute {minute}: {p:?}");
            assert!(p.upper <= 50.0 + 70.0, "minute {minute}: {p:?}");
            if *minute >= 34 {
                assert!(p.upper <= 55.0, "minute {minute}: {p:?}");
            }
        }
    }

    /// `spec.forecast: {model: Trend}`'s defaults (1m buckets, 1d of history, refit every 6h,
    /// confidence 99.9, no `minHeadroom`), for a metric with a target of 70 per replica.
    fn trend_defaults() -> Forecaster {
        Forecaster::new(
            ForecastSettings {
                history: TimeDelta::days(1),
                step: TimeDelta::minutes(1),
                refit: TimeDelta::hours(6),
                confidence: 0.999,
                ..settings(ModelKind::Trend)
            },
            70.0,
        )
    }

    /// A controller's history read: the values at every `every` seconds from `held()` before
    /// `now` to one interval before it.
    fn read_history(
        f: &Forecaster,
        now: i64,
        every: i64,
        value: impl Fn(i64) -> f64,
    ) -> Vec<(DateTime<Utc>, f64)> {
        let start = now - f.settings.held().num_seconds();
        (0..)
            .map(|k| start + every * k)
            .take_while(|t| *t < now)
            .map(|t| (DateTime::from_timestamp(t, 0).expect("time"), value(t)))
            .collect()
    }

    /// The forecast at `t` of a forecaster started then (as after a restart, or `dry-run`): a
    /// history read of `value` since `t0`, every 15 s, then the value at `t`.
    fn started_at(
        s: ForecastSettings,
        t0: i64,
        t: i64,
        value: impl Fn(i64) -> f64,
    ) -> Option<Prediction> {
        let now = DateTime::from_timestamp(t, 0).expect("time");
        let mut fresh = Forecaster::new(s, 10.0);
        let read: Vec<_> = read_history(&fresh, t, 15, &value)
            .into_iter()
            .filter(|(at, _)| at.timestamp() >= t0)
            .collect();
        fresh.reload(read);
        fresh.observe(now, value(t));
        fresh.forecast(now)
    }

    /// Whether two forecasts agree to within rounding.
    fn same_forecast(a: &Prediction, b: &Prediction) -> bool {
        (a.point - b.point).abs() <= 1e-6 * a.point.abs().max(1.0)
            && (a.upper - b.upper).abs() <= 1e-6 * a.upper.abs().max(1.0)
    }

    /// Issue 16, F11: the controller starts on a day of a flat 50 req/s (its history read),
    /// then the rate steps to a flat 400. The fit on the flat day could not tell parameters
    /// apart; it used to keep the slowest level, whose lag errors grew the headroom on the flat
    /// 400 for hours (`Trend forecast 727 → 868 → 996`, pinned at maxReplicas 10). Now the tie
    /// goes to the naive forecast and the step is a surprise that refits: the upper bound is
    /// 400, 6 replicas at 70 per replica, from the minute after the step on.
    #[test]
    fn a_step_after_a_flat_read_history_is_a_new_level() {
        let mut f = trend_defaults();
        let t0 = 1_700_000_040i64; // a multiple of a minute
        let step_at = t0 + 120;
        let value = |t: i64| if t < step_at { 50.0 } else { 400.0 };
        let read = read_history(&f, t0, 15, value);
        f.reload(read);
        for k in 0..(20 * 4) {
            let t = t0 + 15 * k;
            let now = DateTime::from_timestamp(t, 0).expect("time");
            f.observe(now, value(t));
            let p = f.forecast(now).expect("a forecast");
            if t >= step_at + 60 {
                assert!((p.point - 400.0).abs() < 1.0, "at {}s: {p:?}", t - step_at);
                assert_eq!((p.upper / 70.0).ceil(), 6.0, "at {}s: {p:?}", t - step_at);
            }
        }
    }

    /// The same step in a young history (the e2e test's timescale: 5 s buckets, 4 minutes of
    /// history, 30 s of it flat): the step's error is counted as 0 while it is being told apart
    /// from a burst, so the upper bound never leaves 400 (it read 2874.874 → 42 for the three
    /// buckets after the step, scaling the target to its ceiling). A burst that comes back is
    /// told apart at once, and its error raises the headroom.
    #[test]
    fn a_step_in_a_young_history_is_a_new_level_and_a_burst_raises_the_headroom() {
        let s = ForecastSettings {
            history: TimeDelta::minutes(4),
            step: TimeDelta::seconds(5),
            refit: TimeDelta::minutes(1),
            horizon: TimeDelta::seconds(10),
            confidence: 0.999,
            ..settings(ModelKind::Trend)
        };
        let run = |value: &dyn Fn(i64) -> f64| {
            let mut f = Forecaster::new(s, 70.0);
            let t0 = 1_700_000_040i64;
            (0..240)
                .map(|k| {
                    let now = DateTime::from_timestamp(t0 + k, 0).expect("time");
                    f.observe(now, value(k));
                    (k, f.forecast(now))
                })
                .collect::<Vec<_>>()
        };
        for (k, p) in run(&|k| if k < 30 { 50.0 } else { 400.0 }) {
            if let Some(p) = p {
                assert!(p.upper <= 400.0 + 1e-6, "at {k}s: {p:?}");
            }
        }
        let burst = run(&|k| if (30..35).contains(&k) { 300.0 } else { 100.0 });
        let after = burst[60].1.expect("a forecast");
        assert!(after.upper > 150.0, "{after:?}");
    }

    /// Level shifts that are the series' habit (the web-service trace's 5-minute samples jump
    /// several-fold every few minutes) are errors the model makes again: after the first, they
    /// count in the headroom, which then covers the next jump.
    #[test]
    fn frequent_level_shifts_count_in_the_headroom() {
        let mut f = trend_defaults();
        let t0 = 1_700_000_040i64;
        let value = |t: i64| {
            if ((t - t0) / 300) % 2 == 0 {
                50.0
            } else {
                400.0
            }
        };
        let mut last = None;
        for k in 0..(6 * 60 * 4) {
            let t = t0 + 15 * k;
            let now = DateTime::from_timestamp(t, 0).expect("time");
            f.observe(now, value(t));
            last = f.forecast(now);
        }
        let p = last.expect("a forecast");
        assert!(p.upper > p.point + 100.0, "{p:?}");
    }

    /// The forecast is a function of the history and the time, not of when the forecaster
    /// started: one fed every 15 s for five hours (young at first, refitted every 30 minutes,
    /// through a step and noise) and one started afresh from a history read at each moment
    /// (as after a restart, or `dry-run`) forecast alike.
    #[test]
    fn a_forecaster_started_from_a_history_read_forecasts_as_one_running_all_along() {
        let s = ForecastSettings {
            history: TimeDelta::hours(2),
            step: TimeDelta::minutes(1),
            refit: TimeDelta::minutes(30),
            confidence: 0.99,
            ..settings(ModelKind::Trend)
        };
        let t0 = 1_700_000_040i64;
        let value = |t: i64| {
            let noise = ((t / 15).wrapping_mul(2_654_435_761) % 1000) as f64 / 100.0;
            let level = if t < t0 + 3 * 3600 { 100.0 } else { 300.0 };
            level + noise + 20.0 * ((t - t0) as f64 / 1800.0).sin()
        };
        let mut running = Forecaster::new(s, 10.0);
        let mut compared = 0;
        for k in 0..(5 * 60 * 4) {
            let t = t0 + 15 * k;
            let now = DateTime::from_timestamp(t, 0).expect("time");
            running.observe(now, value(t));
            let live = running.forecast(now);
            if k % 29 != 5 {
                continue;
            }
            match (live, started_at(s, t0, t, value)) {
                (Some(a), Some(b)) => {
                    assert!(
                        same_forecast(&a, &b),
                        "at {}s: running {a:?}, started {b:?}",
                        t - t0
                    );
                    compared += 1;
                }
                (a, b) => assert_eq!(a.is_some(), b.is_some(), "at {}s", t - t0),
            }
        }
        assert!(compared > 30, "{compared}");
    }

    /// A metric that surprises the model every few minutes (bursts at random heights) costs at
    /// most one surprise refit an hour, not one a burst; and the forecast stays a function of
    /// the history (a forecaster started from a history read agrees with the running one).
    #[test]
    fn surprises_refit_at_most_once_an_hour() {
        let s = ForecastSettings {
            history: TimeDelta::hours(6),
            step: TimeDelta::minutes(1),
            refit: TimeDelta::hours(6),
            confidence: 0.9,
            ..settings(ModelKind::Trend)
        };
        assert_eq!(s.surprise_refit_gap(), 60);
        let t0 = 1_700_000_040i64;
        let value = |t: i64| {
            let minute = (t - t0) / 60;
            let hash = (minute.wrapping_mul(2_654_435_761) % 997) as f64;
            if minute % 7 == 3 {
                100.0 + hash
            } else {
                100.0 + hash / 100.0
            }
        };
        let mut running = Forecaster::new(s, 10.0);
        let (mut refits, mut anchors) = (Vec::new(), Vec::new());
        for k in 0..(5 * 60 * 4) {
            let t = t0 + 15 * k;
            let now = DateTime::from_timestamp(t, 0).expect("time");
            running.observe(now, value(t));
            let _ = running.forecast(now);
            if let Some(b) = running.surprise_fit
                && refits.last() != Some(&b)
            {
                refits.push(b);
                anchors.push(running.anchor);
            }
        }
        // Five hours of a burst every 7 minutes: about 40 surprises. Each scheduled fit (here
        // also the young history's doublings) starts the hour afresh; within one, at most one
        // refit an hour.
        let mut scheduled = anchors.clone();
        scheduled.dedup();
        assert!(refits.len() >= 2, "{refits:?}");
        assert!(
            refits.len() <= scheduled.len() + 5,
            "{refits:?} under {scheduled:?}"
        );
        for (pair, anchor) in refits.windows(2).zip(anchors.windows(2)) {
            assert!(
                pair[1] - pair[0] >= 60 || anchor[0] != anchor[1],
                "surprise refits at buckets {pair:?} under one scheduled fit"
            );
        }
        let t = t0 + 15 * (5 * 60 * 4 - 1);
        let now = DateTime::from_timestamp(t, 0).expect("time");
        let a = running.forecast(now).expect("running forecast");
        let b = started_at(s, t0, t, value).expect("started forecast");
        assert!(same_forecast(&a, &b), "running {a:?}, started {b:?}");
    }

    /// A single step among flat buckets is not extrapolated; a ramp is, once three buckets in a
    /// row confirm it, and never steeper than the gentlest of them.
    #[test]
    fn a_trend_is_extrapolated_only_where_recent_changes_confirm_it() {
        let step = some((0..100).map(|i| if i < 99 { 100.0 } else { 200.0 }));
        let f = fit(&step, 0, ModelKind::Trend, 0, 0.95).expect("fits");
        assert!(f.predict(5) <= 200.0 + 1e-9, "{}", f.predict(5));
        let ramp = some((0..100).map(|i| {
            if i < 96 {
                100.0
            } else {
                100.0 + 10.0 * (i - 95) as f64
            }
        }));
        let f = fit(&ramp, 0, ModelKind::Trend, 0, 0.95).expect("fits");
        let one = f.predict(1);
        assert!(one > 140.0 && one <= 150.0 + 1e-9, "{one}");
        assert_eq!(confirmed_trend(5.0, [1.0, 2.0, 3.0].into_iter()), 1.0);
        assert_eq!(confirmed_trend(-5.0, [-1.0, -2.0, -3.0].into_iter()), -1.0);
        assert_eq!(confirmed_trend(0.5, [1.0, 2.0, 3.0].into_iter()), 0.5);
        assert_eq!(confirmed_trend(5.0, [1.0, -2.0, 3.0].into_iter()), 0.0);
        assert_eq!(confirmed_trend(5.0, [1.0, 2.0].into_iter()), 0.0);
        assert_eq!(confirmed_trend(-5.0, [1.0, 2.0, 3.0].into_iter()), 0.0);
    }

    /// A value below its prediction never raises what the headroom takes: the quantile of the
    /// errors and the recent share are no higher after it than both before it and after a value
    /// the model predicted exactly (noisy history with a burst, so both are above 0).
    #[test]
    fn an_over_forecast_never_raises_the_headroom() {
        let series = some((0..120).map(|i| {
            let noise = ((i * 37) % 11) as f64 - 5.0;
            if i == 100 { 300.0 } else { 100.0 + noise }
        }));
        let before = fit(&series, 0, ModelKind::Trend, 0, 0.999).expect("fits");
        let predicted = before.predict(1);
        let after = |y: f64| {
            let mut f = before.clone();
            f.observe_bucket(Some(y), 0.999);
            f
        };
        let exact = after(predicted);
        assert!(before.error_quantile(0.999) > 1.0 && before.recency(1.0) > 0.0);
        for share in [0.99, 0.9, 0.5, 0.1, 0.0] {
            let over = after(predicted * share);
            for p in [0.9, 0.999, 1.0] {
                assert!(
                    over.error_quantile(p) <= before.error_quantile(p).min(exact.error_quantile(p)),
                    "{share} of the prediction, p {p}"
                );
            }
            assert!(
                over.recency(1.0) <= before.recency(1.0).max(exact.recency(1.0)),
                "{share} of the prediction: {} vs {} and {}",
                over.recency(1.0),
                before.recency(1.0),
                exact.recency(1.0)
            );
        }
    }

    /// A second fit of the same history takes the grid search from the memo and is the same
    /// model; a history that differs in one bucket, its first bucket or its season is searched
    /// anew.
    #[test]
    fn a_history_searched_once_is_not_searched_again() {
        // Values no other test fits, so the first search is this test's own.
        let series: Vec<Option<f64>> = (0..200)
            .map(|i| Some(0.3 + 0.2 * (f64::from(i) * 0.37).sin() + 1.0e-7 * std::f64::consts::E))
            .collect();
        let (first, hit) = memo::best_params(&series, 11, 0).expect("a fit");
        assert!(!hit, "the first search of a new history is not in the memo");
        let (again, hit) = memo::best_params(&series, 11, 0).expect("a fit");
        assert!(hit);
        assert_eq!((first.0, first.1.to_bits()), (again.0, again.1.to_bits()));
        let mut other = series.clone();
        other[150] = other[150].map(|v| v + 1e-12);
        assert!(!memo::best_params(&other, 11, 0).expect("a fit").1);
        assert!(!memo::best_params(&series, 12, 0).expect("a fit").1);
        assert!(!memo::best_params(&series, 11, 50).expect("a fit").1);
        let fitted =
            |series: &[Option<f64>]| fit(series, 11, ModelKind::Trend, 0, 99.0).expect("a fit");
        assert_eq!(fitted(&series), fitted(&series));
    }

    /// The memo never holds more than two generations, however many histories are fitted. (Its
    /// own instance, so the process-wide memo other tests read is not flushed meanwhile.)
    #[test]
    fn the_memo_is_bounded() {
        let mut held = memo::Generations::default();
        let params = Params {
            alpha: 1.0,
            beta: 0.01,
            gamma: 0.0,
            phi: 0.9,
        };
        for i in 0..2 * memo::GENERATION + 10 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            held.insert(key, (params, 0.0));
            assert!(held.len() <= 2 * memo::GENERATION);
        }
    }

    fn series_strategy() -> impl Strategy<Value = Vec<Option<f64>>> {
        prop_oneof![
            Just(Vec::new()),
            (any::<f64>(), 0usize..300).prop_map(|(c, n)| vec![Some(c); n]),
            prop::collection::vec(
                prop_oneof![
                    3 => (-1e6f64..1e6).prop_map(Some),
                    1 => Just(None),
                    1 => prop_oneof![
                        Just(Some(f64::MAX)),
                        Just(Some(-f64::MAX)),
                        Just(Some(1e300)),
                        Just(Some(f64::NAN)),
                        Just(Some(f64::INFINITY)),
                    ],
                ],
                0..400
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn fit_never_panics_and_forecasts_are_finite(
            series in series_strategy(),
            seasonal in any::<bool>(),
            season in 2usize..60,
            h in 1usize..50,
        ) {
            let kind = if seasonal { ModelKind::HoltWinters } else { ModelKind::Trend };
            if let Some(f) = fit(&series, 7, kind, season, 0.95) {
                let p = f.predict(h);
                let finite_input = series.iter().flatten().all(|v| v.is_finite() && v.abs() < 1e300);
                if finite_input {
                    prop_assert!(p.is_finite(), "{p}");
                    prop_assert!(f.sigma().is_finite());
                }
            }
        }

        #[test]
        fn the_bound_picks_what_scoring_every_set_whole_picks(
            series in series_strategy(),
            season in prop_oneof![Just(0usize), 2usize..40],
        ) {
            let peak = series.iter().flatten().filter(|v| v.is_finite()).fold(0.0f64, |m, v| m.max(v.abs()));
            let scale = if peak > 0.0 { peak } else { 1.0 };
            let scaled: Vec<Option<f64>> =
                series.iter().map(|v| v.filter(|v| v.is_finite()).map(|v| v / scale)).collect();
            let season = if scaled.len() >= 2 * season { season } else { 0 };
            let whole = best_params(&scaled, 3, season, false);
            let bounded = best_params(&scaled, 3, season, true);
            prop_assert_eq!(
                whole.map(|(p, s)| (p, s.to_bits())),
                bounded.map(|(p, s)| (p, s.to_bits()))
            );
            // The memo returns the same search, the first time and when it holds it.
            for _ in 0..2 {
                let memoised = memo::best_params(&scaled, 3, season).map(|(found, _)| found);
                prop_assert_eq!(
                    whole.map(|(p, s)| (p, s.to_bits())),
                    memoised.map(|(p, s)| (p, s.to_bits()))
                );
            }
        }

        #[test]
        fn the_bound_keeps_the_winner_on_noisy_seasonal_demand(
            noise in prop::collection::vec(-0.3f64..0.3, 600),
            bursts in prop::collection::vec((0usize..600, 1.0f64..4.0), 0..6),
        ) {
            let mut series: Vec<Option<f64>> = noise
                .iter()
                .enumerate()
                .map(|(i, n)| Some(1.0 + (i as f64 / 48.0 * std::f64::consts::TAU).sin() * 0.5 + n))
                .collect();
            for (at, size) in bursts {
                series[at] = series[at].map(|v| v * size);
            }
            let scaled: Vec<Option<f64>> = series.iter().map(|v| v.map(|v| v / 6.0)).collect();
            for season in [0, 48] {
                let whole = best_params(&scaled, 0, season, false);
                let bounded = best_params(&scaled, 0, season, true);
                prop_assert_eq!(
                    whole.map(|(p, s)| (p, s.to_bits())),
                    bounded.map(|(p, s)| (p, s.to_bits()))
                );
            }
        }

        #[test]
        fn forecaster_never_panics_and_is_finite(
            series in series_strategy(),
            gap_every in 1usize..20,
        ) {
            let mut f = Forecaster::new(
                ForecastSettings {
                    season: TimeDelta::hours(1),
                    min_headroom: 0.5,
                    ..settings(ModelKind::HoltWinters)
                },
                1e9,
            );
            let t0 = DateTime::from_timestamp(1_700_000_000, 0).expect("time");
            for (k, v) in series.iter().enumerate() {
                // Irregular times with gaps of up to a day.
                let t = t0 + TimeDelta::seconds((k * 60 + (k % gap_every) * 3600) as i64);
                if let Some(v) = v {
                    f.observe(t, *v);
                }
                if let Some(p) = f.forecast(t) {
                    prop_assert!(p.point.is_finite() && p.upper.is_finite());
                    prop_assert!(p.upper >= 0.0);
                }
            }
        }
    }
}
