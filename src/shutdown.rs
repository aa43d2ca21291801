//! The one shutdown path: SIGTERM or SIGINT ends the process's serving, in the way each
//! asks for (an orchestrator's SIGTERM gets a lame-duck period first; a person's SIGINT
//! does not).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Which signal asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// SIGTERM: Kubernetes (or a supervisor) is replacing the process.
    Term,
    /// SIGINT: someone pressed Ctrl-C.
    Int,
    /// The token was cancelled otherwise.
    Cancelled,
}

/// Waits for the first SIGTERM or SIGINT (or for `token` to be cancelled otherwise) and says
/// which it was; the caller decides when to cancel.
pub(crate) async fn wait(token: &CancellationToken) -> std::io::Result<Stop> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => {
            info!(signal = "SIGTERM", "shutting down");
            Stop::Term
        }
        _ = int.recv() => {
            info!(signal = "SIGINT", "shutting down");
            Stop::Int
        }
        () = token.cancelled() => Stop::Cancelled,
    })
}

/// Cancels `token` on the first SIGTERM or SIGINT (or returns when it is cancelled otherwise).
pub(crate) async fn on_signal(token: CancellationToken) -> std::io::Result<()> {
    wait(&token).await?;
    token.cancel();
    Ok(())
}
