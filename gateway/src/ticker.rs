//! The clock of the gateway's periodic tasks (health checks, discovery, the rollout
//! controller, the shared-state sync): a tick every period, until the gateway stops.

use std::time::Duration;

/// Ticks every `period` until `stop` changes. A tick missed while the task was busy is
/// taken late, not bunched with the next.
pub(crate) struct Ticker {
    interval: tokio::time::Interval,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Ticker {
    pub(crate) fn new(period: Duration, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { interval, stop }
    }

    /// Waits for the next tick: `true`, or `false` once the gateway stops.
    pub(crate) async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.interval.tick() => true,
            _ = self.stop.changed() => false,
        }
    }
}
