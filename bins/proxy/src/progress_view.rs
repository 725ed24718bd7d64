//! Progress of a backup or replication job for the operator: on a terminal, indicatif bars (one
//! for the whole job with rate and ETA, one per disk in the copy phase); otherwise a plain line
//! every 10 seconds, for logs. Also the steps of a repository's verify, gc and copy.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use orchestration::Metrics;

/// The running view; dropping it stops it and clears the bars.
#[derive(Debug)]
pub(crate) struct ProgressView {
    task: tokio::task::JoinHandle<()>,
    bars: Option<MultiProgress>,
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(m) = &self.bars {
            let _ = m.clear();
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Starts showing the progress of `vms` VMs counted by `metrics`: bars when stderr is a
/// terminal and `quiet` is false, plain lines otherwise.
pub(crate) fn start(metrics: Arc<Metrics>, vms: usize, quiet: bool) -> ProgressView {
    let done_vms = |m: &Metrics| {
        let s = m.snapshot();
        s.vms_succeeded + s.vms_warned + s.vms_failed
    };
    if quiet || !std::io::stderr().is_terminal() {
        let task = tokio::spawn(async move {
            let mut last = None;
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let p = metrics.progress.snapshot();
                let s = metrics.snapshot();
                let now = (done_vms(&metrics), p.done());
                if last == Some(now) {
                    continue;
                }
                last = Some(now);
                eprintln!(
                    "progress: {} of {vms} VMs done, {} disks copying, {} of {} MB, {:.1} MB/s",
                    now.0,
                    s.disks_copying,
                    p.done() / 1_000_000,
                    p.planned / 1_000_000,
                    p.rate() / 1e6
                );
            }
        });
        return ProgressView { task, bars: None };
    }
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5));
    let total = multi.add(ProgressBar::new(0));
    total.set_style(style("{msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"));
    let m2 = multi.clone();
    let task = tokio::spawn(async move {
        let mut shown: HashMap<u64, ProgressBar> = HashMap::new();
        loop {
            let p = metrics.progress.snapshot();
            total.set_length(p.planned.max(1));
            total.set_position(p.done().min(p.planned));
            total.set_message(format!("{} of {vms} VMs done", done_vms(&metrics)));
            let active = metrics.active_disks();
            shown.retain(|id, bar| {
                let alive = active.iter().any(|(i, _, _)| i == id);
                if !alive {
                    bar.finish_and_clear();
                    m2.remove(bar);
                }
                alive
            });
            for (id, label, progress) in &active {
                let bar = shown.entry(*id).or_insert_with(|| {
                    let b = m2.add(ProgressBar::new(0));
                    b.set_style(style("  {msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}"));
                    b.set_message(label.clone());
                    b
                });
                let d = progress.snapshot();
                bar.set_length(d.planned.max(1));
                bar.set_position(d.done().min(d.planned));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    ProgressView { task, bars: Some(multi) }
}

/// Shows one copy's progress (`repo backup`, `repo restore`, `disk-copy`): a bar with bytes,
/// rate and ETA when stderr is a terminal and `quiet` is false; otherwise, unless quiet, a
/// plain line every 10 seconds for logs.
pub(crate) fn copy(progress: Arc<pipeline::progress::Progress>, what: &str, quiet: bool) -> ProgressView {
    if quiet {
        return ProgressView { task: tokio::spawn(async {}), bars: None };
    }
    let what = what.to_owned();
    if !std::io::stderr().is_terminal() {
        let task = tokio::spawn(async move {
            let mut last = None;
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let p = progress.snapshot();
                if last == Some(p.done()) {
                    continue;
                }
                last = Some(p.done());
                eprintln!("progress: {}", copy_line(&what, &p));
            }
        });
        return ProgressView { task, bars: None };
    }
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5));
    let bar = multi.add(ProgressBar::new(0));
    bar.set_style(style("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"));
    bar.set_message(what);
    let task = tokio::spawn(async move {
        loop {
            let p = progress.snapshot();
            bar.set_length(p.planned.max(1));
            bar.set_position(p.done().min(p.planned));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    ProgressView { task, bars: Some(multi) }
}

/// The view of a repository operation's steps; dropping it stops it and clears its bar.
#[derive(Debug)]
pub(crate) struct StepsView {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StepsView {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One line of a repository operation's progress: its phase, and the count when known.
fn steps_line(phase: &str, done: u64, total: u64) -> String {
    if total == 0 {
        return format!("{phase}: {done}");
    }
    #[expect(clippy::cast_precision_loss, reason = "a percentage, shown rounded")]
    let pct = 100.0 * done.min(total) as f64 / total as f64;
    format!("{phase}: {done} of {total} ({pct:.0}%)")
}

/// Shows `steps` as a repository operation (`repo verify`, `gc`, `copy`) goes: a bar with the
/// phase and its count when stderr is a terminal, else a line every 10 seconds; nothing when
/// `quiet`. It runs on its own thread, since those operations block the one they run on.
pub(crate) fn steps(steps: Arc<repo::Steps>, quiet: bool) -> StepsView {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if quiet {
        return StepsView { stop, thread: None };
    }
    let terminal = std::io::stderr().is_terminal();
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let stopped = || flag.load(std::sync::atomic::Ordering::Relaxed);
        if !terminal {
            let mut last = None;
            while !stopped() {
                for _ in 0..50 {
                    std::thread::sleep(Duration::from_millis(200));
                    if stopped() {
                        return;
                    }
                }
                let (phase, done, total) = steps.snapshot();
                if last.as_ref() != Some(&(phase.clone(), done)) {
                    eprintln!("progress: {}", steps_line(&phase, done, total));
                    last = Some((phase, done));
                }
            }
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(5));
        bar.set_style(style("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}"));
        let mut shown = String::new();
        while !stopped() {
            let (phase, done, total) = steps.snapshot();
            if phase != shown {
                bar.reset();
                bar.set_message(phase.clone());
                shown = phase;
            }
            bar.set_length(total.max(done));
            bar.set_position(done);
            std::thread::sleep(Duration::from_millis(200));
        }
        bar.finish_and_clear();
    });
    StepsView { stop, thread: Some(thread) }
}

/// One line of a copy's progress, for logs.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a rate in bytes per second, shown rounded: never negative, far below u64::MAX"
)]
fn copy_line(what: &str, p: &pipeline::progress::ProgressSnapshot) -> String {
    let pct = if p.planned > 0 { 100.0 * p.done().min(p.planned) as f64 / p.planned as f64 } else { 100.0 };
    let eta = p
        .eta()
        .map_or_else(|| "-".to_owned(), |e| humantime::format_duration(Duration::from_secs(e.as_secs())).to_string());
    format!(
        "{what}: {pct:.0}%, {} of {}, {}/s, {} read, ETA {eta}",
        orchestration::human_bytes(p.done().min(p.planned)),
        orchestration::human_bytes(p.planned),
        orchestration::human_bytes(p.rate() as u64),
        orchestration::human_bytes(p.read),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steps_line_says_the_phase_and_how_far_it_has_come() {
        assert_eq!(steps_line("checking chunks", 250, 1000), "checking chunks: 250 of 1000 (25%)");
        assert_eq!(steps_line("listing", 7, 0), "listing: 7");
    }

    #[test]
    fn a_copy_line_is_readable_without_a_calculator() {
        let p = pipeline::progress::ProgressSnapshot {
            planned: 4 << 30,
            resumed: 0,
            read: 1 << 30,
            read_back: 0,
            written: 1 << 30,
            kept: 0,
            zero: 1 << 30,
            retries: 0,
            checkpoints: 0,
            elapsed: Duration::from_secs(4),
        };
        assert_eq!(copy_line("db01", &p), "db01: 50%, 2.0 GiB of 4.0 GiB, 512.0 MiB/s, 1.0 GiB read, ETA 4s");
    }
}
