//! Coordinated shutdown: one broadcast every long-lived task watches, and an
//! mpsc "all done" channel whose senders the tasks hold until they end.

use tokio::sync::broadcast;

/// Listens for the node-wide shutdown signal.
pub struct Shutdown {
    /// Remembers the signal once seen, so later checks need no channel.
    is_shutdown: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    pub fn new(notify: broadcast::Receiver<()>) -> Shutdown {
        Shutdown {
            is_shutdown: false,
            notify,
        }
    }

    pub fn is_shutdown(&self) -> bool {
        self.is_shutdown
    }

    /// Resolves when shutdown starts (at once if it already has).
    /// Cancel-safe, so it can sit in a `select!` loop.
    pub async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        // Err means the sender is gone, which also means shutdown.
        let _ = self.notify.recv().await;
        self.is_shutdown = true;
    }
}
