//! Live progress on stderr while a run goes on: an indicatif bar on a terminal, otherwise one
//! plain line per second (so logs of scripted runs stay readable). Each update shows the rate,
//! the errors so far and the p99 latency of the successful requests since the last update, so a
//! long run (a soak) shows whether its tail latency stays steady.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use crate::load::{Phase, PhaseCell, RunConfig, StopAt};
use crate::stats::Outcome;

/// How often the bar is refreshed.
const BAR_TICK: Duration = Duration::from_millis(250);
/// How often a plain progress line is printed.
const LINE_TICK: Duration = Duration::from_secs(1);

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// An indicatif bar (stderr is a terminal).
    Bar,
    /// A plain line per second.
    Lines,
    /// Nothing (`--quiet`).
    Off,
}

/// Requests finished so far, in every phase, and the latencies of the current update window;
/// updated by the workers.
#[derive(Debug)]
pub struct LiveCounters {
    successes: AtomicU64,
    errors: AtomicU64,
    window: Mutex<Option<Histogram<u64>>>,
    keeps_latency: bool,
}

impl LiveCounters {
    /// Counters for a run shown in `mode`; latencies are only kept when something shows them,
    /// so a `--quiet` run takes no lock per request.
    pub fn new(mode: ProgressMode) -> Self {
        LiveCounters {
            successes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            // Auto-resizing, 2 significant digits: plenty for a progress line.
            window: Mutex::new(Histogram::new(2).ok()),
            keeps_latency: mode != ProgressMode::Off,
        }
    }

    /// Counts one finished request; a successful one's latency goes into the window.
    pub fn count(&self, outcome: Outcome, latency: Duration) {
        let counter = if outcome.is_success() {
            &self.successes
        } else {
            &self.errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.keeps_latency && outcome.is_success() {
            let micros = u64::try_from(latency.as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            if let Ok(mut guard) = self.window.lock() {
                if let Some(window) = guard.as_mut() {
                    let _ = window.record(micros);
                }
            }
        }
    }

    /// p99 latency of the successful requests since the last call, then a fresh window.
    fn take_window_p99(&self) -> Option<Duration> {
        let mut guard = self.window.lock().ok()?;
        let window = guard.as_mut()?;
        let p99 = (!window.is_empty()).then(|| window.value_at_quantile(0.99));
        window.reset();
        p99.map(Duration::from_micros)
    }

    /// `(successes, errors)` so far.
    fn snapshot(&self) -> (u64, u64) {
        (
            self.successes.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// The running progress display; [`Progress::finish`] removes it.
#[derive(Debug)]
pub struct Progress {
    task: Option<JoinHandle<()>>,
    bar: Option<ProgressBar>,
}

/// What the ticking task needs.
#[derive(Debug)]
struct Ticker {
    live: Arc<LiveCounters>,
    phase: Arc<PhaseCell>,
    bar: Option<ProgressBar>,
    stop: StopAt,
    warmup: Duration,
}

impl Progress {
    /// Starts showing the progress of the run described by `config`.
    pub fn start(config: &RunConfig, live: Arc<LiveCounters>, phase: Arc<PhaseCell>) -> Self {
        let bar = match config.progress {
            ProgressMode::Off => {
                return Progress {
                    task: None,
                    bar: None,
                }
            }
            ProgressMode::Lines => None,
            ProgressMode::Bar => Some(new_bar(config)),
        };
        let ticker = Ticker {
            live,
            phase,
            bar: bar.clone(),
            stop: config.stop,
            warmup: config.warmup,
        };
        Progress {
            task: Some(tokio::spawn(ticker.run())),
            bar,
        }
    }

    /// Stops the display and clears the bar.
    pub fn finish(self) {
        if let Some(task) = self.task {
            task.abort();
        }
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A bar whose length is the whole run: milliseconds for a timed run, requests otherwise.
fn new_bar(config: &RunConfig) -> ProgressBar {
    let length = match config.stop {
        StopAt::Elapsed(d) => (config.warmup + d).as_millis() as u64,
        StopAt::Requests(n) => n,
    };
    let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

impl Ticker {
    async fn run(self) {
        let begin = Instant::now();
        let tick = if self.bar.is_some() {
            BAR_TICK
        } else {
            LINE_TICK
        };
        let mut interval = tokio::time::interval(tick);
        interval.tick().await;
        let (mut last_done, mut measured_from) = (0u64, None);
        loop {
            interval.tick().await;
            let (successes, errors) = self.live.snapshot();
            let done = successes + errors;
            let rate = (done - last_done) as f64 / tick.as_secs_f64();
            last_done = done;
            let phase = self.phase.get();
            if phase == Phase::Measure && measured_from.is_none() {
                measured_from = Some(done);
            }
            let label = if phase == Phase::Warmup {
                "warmup"
            } else {
                "measure"
            };
            let p99 = match self.live.take_window_p99() {
                Some(p99) => format!("{:>8.2} ms", p99.as_secs_f64() * 1000.0),
                None => format!("{:>8} ms", "-"),
            };
            let message = format!("{label} {rate:>9.0} ops/s  p99 {p99}  {errors} errors");
            match &self.bar {
                Some(bar) => {
                    bar.set_position(self.position(begin, done, measured_from));
                    bar.set_message(message);
                }
                None => eprintln!("kv-bench: {:>4}s {message}", begin.elapsed().as_secs()),
            }
        }
    }

    /// Bar position: elapsed milliseconds for a timed run, measured requests otherwise.
    fn position(&self, begin: Instant, done: u64, measured_from: Option<u64>) -> u64 {
        match self.stop {
            StopAt::Elapsed(d) => {
                (begin.elapsed().as_millis() as u64).min((self.warmup + d).as_millis() as u64)
            }
            StopAt::Requests(_) => measured_from.map_or(0, |from| done - from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_p99_covers_successes_since_the_last_update_only() {
        let live = LiveCounters::new(ProgressMode::Lines);
        assert_eq!(live.take_window_p99(), None);
        for ms in 1..=100 {
            live.count(Outcome::Ok, Duration::from_millis(ms));
        }
        live.count(Outcome::Connect, Duration::from_secs(30));
        let p99 = live.take_window_p99().unwrap();
        assert!(
            p99 >= Duration::from_millis(98) && p99 <= Duration::from_millis(100),
            "{p99:?}"
        );
        assert_eq!(live.snapshot(), (100, 1));
        assert_eq!(live.take_window_p99(), None, "the window starts afresh");
    }
}
