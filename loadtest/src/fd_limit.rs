//! Raising this process's open-file limit so that tens of thousands of keep-alive
//! connections fit.
//!
//! Every connection is a descriptor. The usual soft limit (1,024 or 20,000 here) is far
//! below 50,000, so the generator raises its soft limit to the hard one, and, when it runs
//! as root, the hard one too, up to what the run needs and never past
//! `/proc/sys/fs/nr_open` (the kernel's ceiling for any process).

use anyhow::{bail, Context, Result};

/// Descriptors kept free beyond the connections: probes, ClickHouse, /proc reads, stdio.
pub const SPARE_DESCRIPTORS: u64 = 1024;

/// The limits before and after raising them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FdLimit {
    pub soft_before: u64,
    pub hard_before: u64,
    pub soft: u64,
    pub hard: u64,
}

fn get_nofile() -> Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and pass by pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

fn set_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's per-process ceiling, `/proc/sys/fs/nr_open` (1,048,576 by default).
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The soft and hard limits to ask for, given the current ones, what is needed, the
/// kernel ceiling and whether the hard limit may be raised (root).
pub fn plan_limits(
    soft: u64,
    hard: u64,
    needed: u64,
    ceiling: u64,
    may_raise_hard: bool,
) -> (u64, u64) {
    let hard = if may_raise_hard && hard < needed {
        needed.min(ceiling).max(hard)
    } else {
        hard
    };
    (soft.max(hard), hard)
}

/// Raises the soft limit to the hard limit, and the hard limit to `needed` when running
/// as root (capped by `nr_open`).
///
/// # Errors
/// When the limits cannot be read, or when the result is still below `needed`.
pub fn raise_for(needed: u64) -> Result<FdLimit> {
    let (soft_before, hard_before) = get_nofile()?;
    let ceiling = nr_open().unwrap_or(hard_before);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (soft, hard) = plan_limits(soft_before, hard_before, needed, ceiling, root);
    let mut hard_error = None;
    if (soft, hard) != (soft_before, hard_before) {
        if let Err(e) = set_nofile(soft, hard) {
            hard_error = Some(e.to_string());
            // Without CAP_SYS_RESOURCE only the soft limit may move; try that alone.
            set_nofile(soft_before.max(hard_before), hard_before).with_context(|| {
                format!(
                    "setrlimit(RLIMIT_NOFILE, {soft}/{hard}) failed ({e}) and so did the soft \
                     limit alone"
                )
            })?;
        }
    }
    let (soft, hard) = get_nofile()?;
    if soft < needed {
        let why = match hard_error {
            Some(e) => format!(
                "raising the hard limit failed ({e}): root without CAP_SYS_RESOURCE, as in \
                 many containers, cannot raise it"
            ),
            None => "run as root, or raise the hard limit with `ulimit -Hn`".to_string(),
        };
        bail!(
            "the open-file limit is {soft} (hard {hard}, nr_open {ceiling}) but the run needs \
             {needed} (--connections + {SPARE_DESCRIPTORS}); {why}"
        );
    }
    Ok(FdLimit {
        soft_before,
        hard_before,
        soft,
        hard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_goes_to_hard_without_root() {
        assert_eq!(
            plan_limits(1024, 20_000, 60_000, 1 << 20, false),
            (20_000, 20_000)
        );
    }

    #[test]
    fn root_raises_hard_up_to_the_kernel_ceiling() {
        assert_eq!(
            plan_limits(1024, 20_000, 60_000, 1 << 20, true),
            (60_000, 60_000)
        );
        assert_eq!(
            plan_limits(1024, 20_000, 60_000, 50_000, true),
            (50_000, 50_000)
        );
        assert_eq!(
            plan_limits(1024, 100_000, 60_000, 1 << 20, true),
            (100_000, 100_000)
        );
    }

    #[test]
    fn reads_the_current_limit() {
        let (soft, hard) = get_nofile().expect("getrlimit works");
        assert!(soft <= hard);
    }
}
