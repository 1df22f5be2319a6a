//! A shard's bound on work in progress: event requests and the body bytes they may hold.
//!
//! A goal spike must not turn into unbounded memory. Each event request takes a permit
//! for one request and its body size (the declared `Content-Length`, or the body limit
//! when the length is unknown, as with chunked bodies) before its body is read, and gives
//! it back when it is answered or abandoned. When a shard is full, the request is answered
//! 503 `overloaded` with `Retry-After` at once. Shard-local: no atomics, no locks.

use std::cell::Cell;
use std::rc::Rc;

/// Counters of one shard.
#[derive(Debug)]
pub struct InFlight {
    requests: Cell<usize>,
    bytes: Cell<usize>,
    max_requests: usize,
    max_bytes: usize,
}

/// Work admitted; releases its share when dropped.
#[derive(Debug)]
pub struct Permit {
    owner: Rc<InFlight>,
    bytes: usize,
}

/// The shard is full; what it holds, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub requests: usize,
    pub bytes: usize,
}

impl InFlight {
    pub fn new(max_requests: usize, max_bytes: usize) -> Rc<Self> {
        Rc::new(Self {
            requests: Cell::new(0),
            bytes: Cell::new(0),
            max_requests,
            max_bytes,
        })
    }

    /// Admits one request holding up to `bytes` body bytes, or refuses it.
    ///
    /// # Errors
    /// [`Full`] when either bound would be passed.
    pub fn admit(self: &Rc<Self>, bytes: usize) -> Result<Permit, Full> {
        let requests = self.requests.get();
        let held = self.bytes.get();
        if requests >= self.max_requests || held.saturating_add(bytes) > self.max_bytes {
            return Err(Full {
                requests,
                bytes: held,
            });
        }
        self.requests.set(requests + 1);
        self.bytes.set(held + bytes);
        Ok(Permit {
            owner: Rc::clone(self),
            bytes,
        })
    }

    /// Requests admitted and not yet answered.
    pub fn requests(&self) -> usize {
        self.requests.get()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let owner = &self.owner;
        owner.requests.set(owner.requests.get().saturating_sub(1));
        owner
            .bytes
            .set(owner.bytes.get().saturating_sub(self.bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_either_bound_and_frees_on_drop() {
        let inflight = InFlight::new(2, 100);
        let a = inflight.admit(60).expect("first fits");
        assert_eq!(
            inflight.admit(50).err(),
            Some(Full {
                requests: 1,
                bytes: 60
            })
        );
        let b = inflight.admit(40).expect("second fits");
        assert!(inflight.admit(0).is_err(), "request bound");
        drop(a);
        drop(b);
        assert_eq!(inflight.requests(), 0);
        assert!(inflight.admit(100).is_ok());
    }
}
