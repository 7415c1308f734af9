//! `ferry receive`: listens for migrations and keeps every guest that
//! arrives, running, until it exits; `--max-memory` bounds the guests it
//! holds and the ones arriving together.

use crate::{exit_for, load_key, outcome_name, summary, usage, ReceiveArgs};
use anyhow::{Context, Result};
use ferry::cpu::CpuMeter;
use ferry::migration::{GuestsHere, MigratableGuest};
use ferry::transport::{Incoming, Receiver, ReceiverConfig, RunContext};
use ferry::units::Bytes;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The guests a receiver holds and the sessions arriving, against its limit.
#[derive(Default)]
pub struct Held {
    /// Guests that arrived, in order: session id, guest, bytes.
    guests: Vec<(u64, Arc<dyn MigratableGuest>, u64)>,
    /// Admitted sessions still arriving: session id → bytes reserved.
    arriving: BTreeMap<u64, u64>,
    max: u64,
}

impl Held {
    /// Nothing held, `max` bytes allowed.
    pub fn new(max: u64) -> Self {
        Self {
            max,
            ..Self::default()
        }
    }

    fn used(&self) -> u64 {
        let held: u64 = self.guests.iter().map(|g| g.2).sum();
        held + self.arriving.values().sum::<u64>()
    }

    /// The admission of session `session` of `bytes`: reserved when it fits.
    pub fn admit(&mut self, session: u64, bytes: u64) -> Result<(), String> {
        let used = self.used();
        if used.saturating_add(bytes) > self.max {
            return Err(format!(
                "this receiver holds or receives {} of guests; {} more would pass its --max-memory of {}",
                Bytes(used),
                Bytes(bytes),
                Bytes(self.max)
            ));
        }
        self.arriving.insert(session, bytes);
        Ok(())
    }

    /// A session ended: its guest is kept, or its reservation freed.
    pub fn ended(&mut self, incoming: &Incoming) {
        let Some(bytes) = self.arriving.remove(&incoming.session_id) else {
            return;
        };
        if let Some(g) = &incoming.guest {
            self.guests.push((incoming.session_id, g.clone(), bytes));
        }
    }

    /// What the reports list.
    pub fn view(&self) -> GuestsHere {
        GuestsHere {
            sessions: self
                .guests
                .iter()
                .map(|g| format!("{:016x}", g.0))
                .collect(),
            memory_bytes: self.guests.iter().map(|g| g.2).sum(),
            max_memory_bytes: self.max,
        }
    }
}

/// Checks the flags a receiver runs under, naming the one out of range.
fn check_ranges(a: &ReceiveArgs) -> Result<()> {
    let out = |flag: &str, what: String| usage(format!("{flag}: {what} is out of range"));
    if a.max_sessions == 0 || a.max_sessions > MAX_SESSIONS {
        return Err(out(
            "--max-sessions",
            format!("{} (1 to {MAX_SESSIONS})", a.max_sessions),
        ));
    }
    let (lo, hi) = HANDSHAKE;
    if a.handshake_timeout < lo || a.handshake_timeout > hi {
        return Err(out(
            "--handshake-timeout",
            format!("{:?} ({lo:?} to {hi:?})", a.handshake_timeout),
        ));
    }
    let (lo, hi) = ferry::migration::ranges::PEER;
    if a.peer_timeout < lo || a.peer_timeout > hi {
        return Err(out(
            "--peer-timeout",
            format!("{:?} ({lo:?} to {hi:?})", a.peer_timeout),
        ));
    }
    let page = ferry::memory::PAGE_SIZE as u64;
    if a.max_memory < page || a.max_memory > ferry::memory::MAX_MEMORY_BYTES {
        return Err(out(
            "--max-memory",
            format!(
                "{} (4 KiB to {})",
                Bytes(a.max_memory),
                Bytes(ferry::memory::MAX_MEMORY_BYTES)
            ),
        ));
    }
    Ok(())
}

/// Most sessions a receiver takes at once.
const MAX_SESSIONS: usize = 4096;
/// The handshake timeout's range: 100 ms to 10 min.
const HANDSHAKE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(600));

fn config(a: &ReceiveArgs, held: &Arc<Mutex<Held>>) -> Result<ReceiverConfig> {
    check_ranges(a)?;
    let held = held.clone();
    Ok(ReceiverConfig {
        max_memory: a.max_memory,
        key: a.key.as_deref().map(load_key).transpose()?,
        idle_timeout: a.peer_timeout,
        fault: a.fault,
        tls: match (&a.tls_cert, &a.tls_key) {
            (Some(c), Some(k)) => {
                Some(ferry::transport::tls::TlsServer::from_pem(c, k).map_err(usage)?)
            }
            // A certificate made now can be known only through the key.
            _ if a.tls && a.key.is_none() => {
                return Err(usage(
                    "--tls needs --tls-cert/--tls-key (for sources to pin) or --key FILE",
                ))
            }
            _ if a.tls => Some(ferry::transport::tls::TlsServer::ephemeral().map_err(usage)?),
            _ => None,
        },
        max_sessions: a.max_sessions,
        kept_streams: ferry::transport::StreamBudget::new(a.kept_streams.into()),
        handshake_timeout: a.handshake_timeout,
        resume_check: Some(Duration::from_secs(1)),
        unauthenticated: if a.insecure {
            ferry::transport::Unauthenticated::Anywhere
        } else {
            ferry::transport::Unauthenticated::Loopback
        },
        admit: Some(Arc::new(move |session, setup| {
            held.lock().unwrap().admit(session, setup.memory_bytes)
        })),
        ..ReceiverConfig::default()
    })
}

/// `ferry receive`.
pub fn receive(a: ReceiveArgs) -> Result<ExitCode> {
    let cpu = CpuMeter::new();
    let rt = ferry::transport::runtime("ferry-dst", 2, &cpu)?;
    let ctx = RunContext {
        cpu,
        ..RunContext::default()
    };
    let held = Arc::new(Mutex::new(Held::new(a.max_memory)));
    let receiver = rt
        .block_on(Receiver::bind(&a.listen, config(&a, &held)?))
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = receiver.local_addr()?;
    tracing::info!(%addr, "listening for migrations");
    let stop = ctx.cancel.clone();
    rt.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop.cancel();
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = rt.spawn(receiver.serve(ctx.clone(), tx));
    let mut last = ferry::migration::Outcome::Cancelled;
    loop {
        let got = rt.block_on(async {
            tokio::select! {
                r = rx.recv() => r,
                _ = ctx.cancel.cancelled() => None,
            }
        });
        let Some(incoming) = got else { break };
        let here = {
            let mut h = held.lock().unwrap();
            h.ended(&incoming);
            h.view()
        };
        let mut r = incoming.report;
        r.guests_here = Some(here.clone());
        last = r.outcome;
        if a.json {
            println!("{}", r.to_json());
        } else {
            println!(
                "incoming migration {} (session {})",
                outcome_name(r.outcome),
                r.session_id
            );
            print!("{}", summary(&r, None));
            println!(
                "  guests here: {} ({} of {})",
                here.sessions.len(),
                Bytes(here.memory_bytes),
                Bytes(here.max_memory_bytes)
            );
        }
        // `--once`: one migration, completed or failed; a session refused
        // before its admission is not one.
        if a.once && incoming.admitted {
            break;
        }
    }
    ctx.cancel.cancel();
    let _ = rt.block_on(server);
    Ok(exit_for(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_counts_held_and_arriving_guests() {
        let mut h = Held::new(100);
        h.admit(1, 60).unwrap();
        let e = h.admit(2, 50).unwrap_err();
        assert!(e.contains("--max-memory"), "{e}");
        h.admit(3, 40).unwrap();
        assert_eq!(h.used(), 100);
    }
}
