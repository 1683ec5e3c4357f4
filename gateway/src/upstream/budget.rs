//! The retry budget (Envoy's): retries in flight may be at most a share of the requests in
//! flight, with a floor, so that a struggling backend is not buried under retries.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts active requests and active retries.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    active: AtomicUsize,
    retries: AtomicUsize,
    percent: usize,
    min: usize,
}

/// Held while a request is active.
#[derive(Debug)]
pub(crate) struct Active<'a>(&'a RetryBudget);

/// Held while a retry is active.
#[derive(Debug)]
pub(crate) struct Retry<'a>(&'a RetryBudget);

impl RetryBudget {
    pub(crate) fn new(percent: u32, min: u32) -> Self {
        Self {
            active: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            percent: percent as usize,
            min: min as usize,
        }
    }

    pub(crate) fn enter(&self) -> Active<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(self)
    }

    /// A retry slot, if the budget allows one now.
    pub(crate) fn try_retry(&self) -> Option<Retry<'_>> {
        let allowed = (self.active.load(Ordering::Acquire) * self.percent / 100).max(self.min);
        self.retries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r < allowed).then_some(r + 1)
            })
            .ok()
            .map(|_| Retry(self))
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Retry<'_> {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_active_requests() {
        let b = RetryBudget::new(20, 2);
        let active: Vec<_> = (0..20).map(|_| b.enter()).collect();
        let retries: Vec<_> = (0..10).filter_map(|_| b.try_retry()).collect();
        assert_eq!(retries.len(), 4, "20% of 20");
        drop(retries);
        drop(active);
        let r: Vec<_> = (0..10).filter_map(|_| b.try_retry()).collect();
        assert_eq!(r.len(), 2, "the floor applies when idle");
    }
}
