//! `--watch-pid`: the server's CPU time and memory over the measured window, from /proc.
//!
//! CPU is `utime + stime` of `/proc/PID/stat` (all threads, in clock ticks, so a 10 ms
//! resolution at the usual 100 Hz); memory is `VmRSS` and `VmHWM` of `/proc/PID/status`.
//! A sample is taken when the measured window opens, once a second, and when it closes;
//! `rss_max_bytes` is the largest `VmRSS` sampled (`VmHWM` is the peak over the process's
//! whole life, warm-up and earlier runs included, so it is reported beside it).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

/// What the report says about a watched process.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerUsage {
    pub pid: u32,
    /// CPU time (user + system) spent in the measured window.
    pub cpu_seconds: f64,
    /// `cpu_seconds` per accepted event of the window, in microseconds.
    pub cpu_us_per_event: f64,
    /// Average cores busy over the window.
    pub cpu_cores: f64,
    pub rss_max_bytes: u64,
    pub rss_end_bytes: u64,
    pub vm_hwm_bytes: u64,
    pub samples: usize,
}

/// `utime + stime` in ticks from the text of `/proc/PID/stat`.
///
/// The command name (field 2) is in parentheses and may hold spaces or parentheses, so
/// fields are counted from the last `)`: state is field 3, utime 14 and stime 15.
pub fn parse_stat_ticks(text: &str) -> Result<u64> {
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .context("no ')' after the command name")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state), so field n is fields[n - 3].
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("no field {n}"))?
            .parse::<u64>()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// `VmRSS` and `VmHWM` in bytes from the text of `/proc/PID/status`.
pub fn parse_status_memory(text: &str) -> Result<(u64, u64)> {
    let kib = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} line"))?;
        let value = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .with_context(|| format!("bad {name} line {line:?}"))?;
        Ok(value * 1024)
    };
    Ok((kib("VmRSS:")?, kib("VmHWM:")?))
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Reads `/proc/PID/stat` and `/proc/PID/status` once.
///
/// # Errors
/// When the process is gone or the files cannot be parsed.
pub fn sample(pid: u32) -> Result<ProcSample> {
    let stat_path = format!("/proc/{pid}/stat");
    let stat =
        std::fs::read_to_string(&stat_path).with_context(|| format!("reading {stat_path}"))?;
    let ticks = parse_stat_ticks(&stat).with_context(|| format!("parsing {stat_path}"))?;
    let status_path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
    let (rss_bytes, hwm_bytes) =
        parse_status_memory(&status).with_context(|| format!("parsing {status_path}"))?;
    Ok(ProcSample {
        cpu_seconds: ticks as f64 / clock_ticks_per_s(),
        rss_bytes,
        hwm_bytes,
    })
}

/// Samples kept between the window's start and end.
#[derive(Debug, Clone)]
pub struct Watch {
    pub pid: u32,
    first: ProcSample,
    last: ProcSample,
    rss_max: u64,
    samples: usize,
}

impl Watch {
    /// Starts watching `pid` with a first sample.
    ///
    /// # Errors
    /// When `pid` cannot be read.
    pub fn start(pid: u32) -> Result<Watch> {
        let first = sample(pid)?;
        Ok(Watch {
            pid,
            first,
            last: first,
            rss_max: first.rss_bytes,
            samples: 1,
        })
    }

    /// Adds a sample; a process that vanished keeps the last good one.
    pub fn tick(&mut self) {
        if let Ok(s) = sample(self.pid) {
            self.add(s);
        }
    }

    fn add(&mut self, s: ProcSample) {
        self.last = s;
        self.rss_max = self.rss_max.max(s.rss_bytes);
        self.samples += 1;
    }

    /// The usage over the window, `accepted` events in `window`.
    pub fn usage(&self, accepted: u64, window: Duration) -> ServerUsage {
        let cpu_seconds = (self.last.cpu_seconds - self.first.cpu_seconds).max(0.0);
        ServerUsage {
            pid: self.pid,
            cpu_seconds,
            cpu_us_per_event: if accepted > 0 {
                cpu_seconds * 1e6 / accepted as f64
            } else {
                0.0
            },
            cpu_cores: if window.as_secs_f64() > 0.0 {
                cpu_seconds / window.as_secs_f64()
            } else {
                0.0
            },
            rss_max_bytes: self.rss_max,
            rss_end_bytes: self.last.rss_bytes,
            vm_hwm_bytes: self.last.hwm_bytes,
            samples: self.samples,
        }
    }
}

/// Checks that `pid` exists before the run starts.
///
/// # Errors
/// When it does not, or is not readable.
pub fn check_pid(pid: u32) -> Result<()> {
    if let Err(e) = sample(pid) {
        bail!("--watch-pid {pid}: {e:#}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (fan finity) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                        250 75 0 0 20 0 9 0 123456 987654321 4321 18446744073709551615 \
                        1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn reads_utime_plus_stime_after_the_command_name() {
        assert_eq!(parse_stat_ticks(STAT).expect("valid"), 325);
        let odd = STAT.replace("(fan finity)", "(a) b) (c)");
        assert_eq!(parse_stat_ticks(&odd).expect("valid"), 325);
        assert!(parse_stat_ticks("4242 (x) S 1").is_err());
    }

    #[test]
    fn reads_rss_and_hwm_in_bytes() {
        let status = "Name:\tfanfinity\nVmPeak:\t  900000 kB\nVmHWM:\t   20480 kB\n\
                      VmRSS:\t   10240 kB\nThreads:\t9\n";
        assert_eq!(
            parse_status_memory(status).expect("valid"),
            (10240 * 1024, 20480 * 1024)
        );
        assert!(parse_status_memory("Name:\tx\n").is_err());
    }

    #[test]
    fn usage_is_the_difference_over_the_window() {
        let s = |cpu: f64, rss: u64| ProcSample {
            cpu_seconds: cpu,
            rss_bytes: rss,
            hwm_bytes: 900,
        };
        let mut w = Watch {
            pid: 1,
            first: s(10.0, 100),
            last: s(10.0, 100),
            rss_max: 100,
            samples: 1,
        };
        w.add(s(11.0, 500));
        w.add(s(12.0, 300));
        let u = w.usage(1_000_000, Duration::from_secs(4));
        assert!((u.cpu_seconds - 2.0).abs() < 1e-9);
        assert!((u.cpu_us_per_event - 2.0).abs() < 1e-9);
        assert!((u.cpu_cores - 0.5).abs() < 1e-9);
        assert_eq!((u.rss_max_bytes, u.rss_end_bytes, u.samples), (500, 300, 3));
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_bytes > 0 && s.hwm_bytes >= s.rss_bytes);
    }
}
