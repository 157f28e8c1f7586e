//! Live progress on stderr while a run goes on: an indicatif bar on a terminal, otherwise one
//! plain line per second (so logs of scripted runs stay readable).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Requests finished so far, in every phase; updated by the workers.
#[derive(Debug, Default)]
pub struct LiveCounters {
    successes: AtomicU64,
    errors: AtomicU64,
}

impl LiveCounters {
    /// Counts one finished request.
    pub fn count(&self, outcome: Outcome) {
        let counter = if outcome.is_success() {
            &self.successes
        } else {
            &self.errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
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
            let message = format!("{label} {rate:>9.0} ops/s  {errors} errors");
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
