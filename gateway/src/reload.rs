//! Policy reload: parse, validate all files, build the whole snapshot, one atomic store.
//! Any error keeps the snapshot in force and is logged, counted and kept for the admin API.
//! Triggers: file changes in the policy folder (debounced), SIGHUP (wired by the binary),
//! and `POST /admin/reload`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use switchyard_config::{Diagnostics, load_policies};
use tracing::{info, warn};

use crate::Shared;
use crate::snapshot::Snapshot;

/// The outcome of the last reload attempt, for `GET /admin/policy`.
#[derive(Debug, Clone)]
pub(crate) struct ReloadStatus {
    pub(crate) at: SystemTime,
    pub(crate) trigger: String,
    /// The version now in force if the reload succeeded.
    pub(crate) version: Option<u64>,
    pub(crate) errors: Vec<String>,
}

impl Shared {
    /// Reloads the policy folder. On success the new snapshot serves every request that
    /// starts from now on; on failure nothing changes.
    pub(crate) async fn reload(self: &Arc<Self>, trigger: &str) -> Result<u64, Diagnostics> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let this = self.clone();
        let loaded =
            tokio::task::spawn_blocking(move || load_policies(&this.config.policies, &this.config))
                .await
                .unwrap_or_else(|e| {
                    Err(Diagnostics(vec![switchyard_config::Diagnostic::file(
                        &self.config.policies,
                        format!("reload task failed: {e}"),
                    )]))
                });
        let result = loaded.map(|policies| {
            let version = self.next_version.fetch_add(1, Ordering::AcqRel);
            let snapshot = Snapshot::build(
                version,
                &policies,
                &self.config,
                &self.upstreams,
                &self.metrics,
            );
            self.snapshot.store(Arc::new(snapshot));
            version
        });
        match &result {
            Ok(version) => {
                self.metrics.reload(true);
                self.metrics.policy_version.set(*version as i64);
                info!(trigger, version, "policies loaded");
            }
            Err(diagnostics) => {
                self.metrics.reload(false);
                let in_force = self.snapshot.load().version;
                for d in &diagnostics.0 {
                    warn!(trigger, in_force, "policy reload rejected: {d}");
                }
            }
        }
        self.last_reload.store(Arc::new(Some(ReloadStatus {
            at: SystemTime::now(),
            trigger: trigger.to_owned(),
            version: result.as_ref().ok().copied(),
            errors: result
                .as_ref()
                .err()
                .map(|d| d.0.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
        })));
        result
    }
}

/// Watches the policy folder and reloads after each quiet period. Handles editors that
/// write in place, atomic renames, and Kubernetes ConfigMap volumes (whose `..data`
/// symlink is swapped in one rename): every event in the folder counts, and a reload
/// reads the folder whole, so a half-written file can at worst fail validation and
/// leave the old snapshot in force until the write completes.
pub(crate) async fn watch(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let dir: PathBuf = shared.config.policies.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let debouncer = new_debouncer(
        shared.config.reload.debounce.0,
        None,
        move |result: DebounceEventResult| {
            if matches!(&result, Ok(events) if !events.is_empty()) {
                let _ = tx.send(());
            }
        },
    );
    let mut debouncer = match debouncer {
        Ok(d) => d,
        Err(e) => {
            warn!(dir = %dir.display(), "cannot watch the policy folder: {e}; reload with SIGHUP or POST /admin/reload");
            return;
        }
    };
    if let Err(e) = debouncer.watch(&dir, RecursiveMode::NonRecursive) {
        warn!(dir = %dir.display(), "cannot watch the policy folder: {e}; reload with SIGHUP or POST /admin/reload");
        return;
    }
    info!(dir = %dir.display(), "watching policies");
    loop {
        tokio::select! {
            event = rx.recv() => {
                if event.is_none() { return; }
                // Coalesce a burst of batches into one reload.
                while rx.try_recv().is_ok() {}
                let _ = shared.reload("file change").await;
            }
            _ = stop.changed() => return,
        }
    }
}
