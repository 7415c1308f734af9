//! Signals for work outside a long-lived runtime: the first SIGINT or
//! SIGTERM cancels, the second exits.

/// Cancels `cancel` on SIGINT or SIGTERM, and exits on a second one, from a
/// thread of its own (for work that runs outside any long-lived runtime, such
/// as the sweep).
pub fn cancel_on_signals(cancel: tokio_util::sync::CancellationToken) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            for second in [false, true] {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                if second {
                    // Asked twice: leave now. A tbf link left behind is
                    // removed by the next sweep (its owner pid is gone).
                    eprintln!("interrupted again: exiting");
                    std::process::exit(130);
                }
                eprintln!("interrupted: cancelling (again to exit at once)");
                cancel.cancel();
            }
        });
    });
}
