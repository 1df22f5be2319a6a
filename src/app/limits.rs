//! Process resource limits the shards need, raised at start-up where allowed.
//!
//! glommio locks memory for its io_uring rings and buffers (RLIMIT_MEMLOCK), and every
//! connection is a file descriptor (RLIMIT_NOFILE). Raising the soft limit to the hard
//! limit needs no privilege; going past the hard limit is the operator's job
//! (`tuning/README.md`).

use tracing::{info, warn};

/// Raises the soft limits of locked memory and open files to their hard limits.
pub fn raise_limits() {
    raise(libc::RLIMIT_MEMLOCK, "memlock");
    raise(libc::RLIMIT_NOFILE, "nofile");
}

fn raise(resource: libc::__rlimit_resource_t, name: &str) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    let got = unsafe { libc::getrlimit(resource, &mut limit) };
    if got != 0 {
        warn!(limit = name, "cannot read resource limit");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let before = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(resource, &limit) } == 0 {
        info!(
            limit = name,
            before,
            after = limit.rlim_cur,
            "raised resource limit"
        );
    } else {
        warn!(
            limit = name,
            current = before,
            "cannot raise resource limit"
        );
    }
}
