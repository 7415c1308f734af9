//! The source's channel tasks: they move bytes and call the session machine.
//!
//! Each connection has a writer task (take work from the machine, encode it,
//! wait for the channel's credit and the bandwidth cap, write) and a reader
//! task (acknowledgements and replies). One control task writes control
//! messages in order; one supervisor task runs the machine's timer. A lost
//! connection's rebind is a task of its own. Every task is tracked and ends
//! with the session.

use super::connect::Connector;
use super::encode::Encoder;
use crate::migration::credits::Credits;
use crate::migration::source_machine::{Begin, ControlTx, Handled, Next, SourceMachine, Transmit};
use crate::migration::ChannelLoss;
use crate::migration::MigrationError;
use crate::migration::Violation;
use crate::transport::RunContext;
use crate::transport::{FrameReader, FrameWriter};
use crate::wire::ChannelId;
use crate::wire::{Limits, Message};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One channel's current connection; a rebind replaces it with the next
/// generation under the same channel number.
pub(super) struct ChanIo {
    pub index: ChannelId,
    pub gen: u32,
    pub writer: tokio::sync::Mutex<FrameWriter>,
    /// Bytes its socket took (moves while the peer reads).
    tx_progress: Arc<AtomicU64>,
    /// Fired once, when the connection is declared dead.
    pub dead: CancellationToken,
    /// Wakes its writer: work queued, a credit granted.
    wake: Notify,
    /// Its kept zstd stream: a new connection starts a new one.
    kept: super::encode::KeptStream,
}

/// What the tasks share: the machine and the connections.
pub(super) struct Shared {
    pub m: Mutex<SourceMachine>,
    chans: Vec<RwLock<Arc<ChanIo>>>,
    /// Wakes the driver (an event, an acknowledgement, a control written).
    pub changed: Notify,
    /// Wakes the control task.
    control_ready: Notify,
    pub encoder: Arc<Encoder>,
    pub ctx: RunContext,
    connector: Connector,
    /// Ends every task of the session.
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
}

impl Shared {
    /// Starts the session's tasks over its bound channels.
    pub fn start(
        m: SourceMachine,
        bound: Vec<super::connect::Bound>,
        encoder: Arc<Encoder>,
        connector: Connector,
        ctx: &RunContext,
    ) -> Arc<Self> {
        let cancel = CancellationToken::new();
        let mut readers = Vec::new();
        let chans = bound
            .into_iter()
            .enumerate()
            .map(|(i, (rd, wr, _))| {
                readers.push(rd);
                RwLock::new(ChanIo::new(ChannelId::nth(i), 0, wr, &cancel))
            })
            .collect();
        let sh = Arc::new(Self {
            m: Mutex::new(m),
            chans,
            changed: Notify::new(),
            control_ready: Notify::new(),
            encoder,
            ctx: ctx.clone(),
            connector,
            cancel,
            tasks: TaskTracker::new(),
        });
        for (i, rd) in readers.into_iter().enumerate() {
            sh.run_chan(sh.chan(ChannelId::nth(i)), rd);
        }
        sh.tasks.spawn(control_task(sh.clone()));
        sh.tasks.spawn(supervisor(sh.clone()));
        sh
    }

    pub fn chan(&self, index: ChannelId) -> Arc<ChanIo> {
        self.chans[index.index()].read().unwrap().clone()
    }

    pub fn channels(&self) -> u16 {
        self.chans.len() as u16
    }

    fn run_chan(self: &Arc<Self>, chan: Arc<ChanIo>, rd: FrameReader) {
        self.tasks
            .spawn(reader_task(self.clone(), chan.clone(), rd));
        self.tasks.spawn(writer_task(self.clone(), chan));
    }

    /// Wakes every writer (work was queued).
    pub fn wake_writers(&self) {
        for i in (0..self.channels()).map(ChannelId) {
            self.chan(i).wake.notify_one();
        }
    }

    /// Queues a control message and wakes the control task; returns its id.
    pub fn queue_control(&self, msg: Message) -> u64 {
        let id = self.m.lock().unwrap().queue_control(msg);
        self.control_ready.notify_one();
        id
    }

    /// Records a failure that ends the session.
    pub fn fail(&self, e: MigrationError) {
        if !self.cancel.is_cancelled() {
            self.m.lock().unwrap().fail(e);
            self.changed.notify_one();
        }
    }

    /// Declares a connection dead in the machine, stops its tasks and
    /// carries out what the machine asks (its rebind).
    fn lose(self: &Arc<Self>, chan: &ChanIo, e: MigrationError) {
        let lost = self
            .m
            .lock()
            .unwrap()
            .handle_lost(Instant::now(), chan.index, chan.gen);
        chan.dead.cancel();
        if lost {
            tracing::warn!(channel = %chan.index, error = %e, "channel failed; its batches go to the other channels while it rebinds");
            self.after_change();
        }
    }

    /// Wakes whoever the machine's last change concerns and starts what it
    /// asks for: keepalives, rebinds.
    fn after_change(self: &Arc<Self>) {
        self.wake_writers();
        self.control_ready.notify_one();
        self.changed.notify_one();
        loop {
            let t = self.m.lock().unwrap().poll_transmit();
            match t {
                None => return,
                Some(Transmit::Rebind { chan, gen }) => {
                    self.tasks.spawn(rebind_task(self.clone(), chan, gen));
                }
                Some(Transmit::Echo {
                    chan,
                    gen,
                    header,
                    msg,
                }) => {
                    let c = self.chan(chan);
                    if c.gen != gen {
                        continue;
                    }
                    let sh = self.clone();
                    self.tasks.spawn(async move {
                        // Never after half a batch the connection died in.
                        let sent = tokio::select! {
                            biased;
                            _ = c.dead.cancelled() => Ok(()),
                            r = async { c.writer.lock().await.send(header, &msg).await } => r,
                        };
                        if let Err(e) = sent {
                            sh.lose(&c, e);
                        }
                    });
                }
            }
        }
    }

    /// Each channel's socket progress, for the machine's silence checks.
    fn tx_bytes(&self) -> Vec<u64> {
        (0..self.channels())
            .map(|i| self.chan(ChannelId(i)).tx_progress.load(Ordering::Relaxed))
            .collect()
    }
}

impl ChanIo {
    fn new(index: ChannelId, gen: u32, wr: FrameWriter, session: &CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            index,
            gen,
            tx_progress: wr.progress(),
            writer: tokio::sync::Mutex::new(wr),
            dead: session.child_token(),
            wake: Notify::new(),
            kept: Default::default(),
        })
    }
}

/// Waits for `chan`'s writer wake-up unless the connection dies first.
async fn woken(chan: &ChanIo) -> bool {
    tokio::select! {
        biased;
        _ = chan.dead.cancelled() => false,
        _ = chan.wake.notified() => true,
    }
}

async fn writer_task(sh: Arc<Shared>, chan: Arc<ChanIo>) {
    if let Err(e) = write_batches(&sh, &chan).await {
        sh.fail(e);
    }
}

async fn write_batches(sh: &Arc<Shared>, chan: &Arc<ChanIo>) -> Result<(), MigrationError> {
    loop {
        let next = sh.m.lock().unwrap().next_work(chan.index, chan.gen);
        let work = match next {
            Next::Dead => return Ok(()),
            Next::Idle => match woken(chan).await {
                true => continue,
                false => return Ok(()),
            },
            Next::Work(w) => w,
        };
        let batch = match sh.encoder.encode_on_pool(&work, &chan.kept).await {
            Ok(b) => b,
            Err(e) => {
                sh.m.lock().unwrap().requeue(work);
                return Err(e);
            }
        };
        let (pages, bytes) = (batch.pages, batch.payload.len());
        let mut work = work;
        let header = loop {
            let begun =
                sh.m.lock()
                    .unwrap()
                    .begin_batch(chan.index, chan.gen, work, pages, bytes);
            match begun {
                Begin::Send(h) => break h,
                Begin::Dead => return Ok(()),
                Begin::NoCredit(w) if woken(chan).await => work = w,
                Begin::NoCredit(w) => {
                    sh.m.lock().unwrap().requeue(w);
                    return Ok(());
                }
            }
        };
        // Only a blocked write says the link is the bottleneck. Waiting for
        // credit may be waiting for a receiver busy applying pages, which
        // is counted in guest bytes: taken for a link rate in wire bytes,
        // it would make compressing look better the more it compresses.
        let sent = tokio::select! {
            biased;
            _ = chan.dead.cancelled() => return Ok(()),
            r = async {
                let mut writer = chan.writer.lock().await;
                let t = Instant::now();
                writer.send_raw(&header, &batch.payload).await.map(|()| t.elapsed())
            } => r,
        };
        match sent {
            Ok(elapsed) => sh.encoder.record_socket(bytes, elapsed, sh.channels()),
            Err(e) if e.is_channel_loss() => {
                sh.lose(chan, e);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        sh.encoder.count(&batch);
    }
}

async fn reader_task(sh: Arc<Shared>, chan: Arc<ChanIo>, rd: FrameReader) {
    match read_frames(&sh, &chan, rd).await {
        Ok(()) => {}
        Err(e) if e.is_channel_loss() => sh.lose(&chan, e),
        Err(e) => sh.fail(e),
    }
}

async fn read_frames(
    sh: &Arc<Shared>,
    chan: &ChanIo,
    mut rd: FrameReader,
) -> Result<(), MigrationError> {
    let ch = chan.index;
    loop {
        let frame = tokio::select! {
            biased;
            _ = chan.dead.cancelled() => return Ok(()),
            f = rd.read_frame() => f?,
        };
        let Some(frame) = frame else {
            return Err(MigrationError::PeerClosed { channel: ch });
        };
        let msg = Message::decode(&frame.header, frame.payload, Limits::BEFORE_SETUP)?;
        let handled =
            sh.m.lock()
                .unwrap()
                .handle_frame(Instant::now(), ch, chan.gen, &frame.header, msg)?;
        match handled {
            Handled::Stale => return Ok(()),
            Handled::Acked { pages, bytes, once } => {
                let progress = &sh.ctx.progress;
                progress
                    .pages_acked
                    .fetch_add(pages.into(), Ordering::Relaxed);
                sh.encoder.record_ack(bytes);
                if let Some(job) = once {
                    sh.encoder.record_held(&job);
                }
                chan.wake.notify_one();
            }
            Handled::Other => {}
        }
        sh.changed.notify_one();
    }
}

/// Writes control messages one at a time, in order, on the lowest-numbered
/// live channel, moving to another (as a resend) when that one fails.
async fn control_task(sh: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = sh.cancel.cancelled() => return,
            _ = sh.control_ready.notified() => {}
        }
        loop {
            let tx = sh.m.lock().unwrap().poll_control();
            let Some(tx) = tx else { break };
            if tx.header.flags != 0 {
                tracing::info!(command = ?tx.msg.command(), "sending a control message again on another channel");
            }
            write_control(&sh, &tx).await;
        }
    }
}

async fn write_control(sh: &Arc<Shared>, tx: &ControlTx) {
    let chan = sh.chan(tx.chan);
    let sent = if chan.gen != tx.gen {
        Err(MigrationError::ChannelLost {
            channel: tx.chan,
            why: ChannelLoss::Replaced,
        })
    } else {
        tokio::select! {
            biased;
            _ = chan.dead.cancelled() => Err(MigrationError::ChannelLost {
                channel: chan.index,
                why: ChannelLoss::FailedWhileSending,
            }),
            r = async { chan.writer.lock().await.send(tx.header, &tx.msg).await } => r,
        }
    };
    sh.m.lock().unwrap().control_done(tx, sent.is_ok());
    match sent {
        Ok(()) => sh.changed.notify_one(),
        Err(e) if e.is_channel_loss() => sh.lose(&chan, e),
        Err(e) => sh.fail(e),
    }
}

/// Connects channel `index` again and binds it to the session as
/// generation `gen`, with backoff, until it is bound or the session ends.
async fn rebind_task(sh: Arc<Shared>, index: ChannelId, gen: u32) {
    let timeout = sh.m.lock().unwrap().peer_timeout();
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt = tokio::select! {
            _ = sh.cancel.cancelled() => return,
            r = tokio::time::timeout(timeout, sh.connector.bind(index)) => r,
        };
        let e = match attempt {
            Ok(Ok((rd, wr, credits))) => {
                let Some(credits) = Credits::new(credits) else {
                    sh.fail(
                        Violation::Credits {
                            channel: Some(index),
                            credits,
                        }
                        .into(),
                    );
                    return;
                };
                tracing::info!(
                    channel = %index,
                    generation = gen,
                    "channel rebound to the session"
                );
                let chan = ChanIo::new(index, gen, wr, &sh.cancel);
                *sh.chans[index.index()].write().unwrap() = chan.clone();
                sh.m.lock()
                    .unwrap()
                    .handle_bound(Instant::now(), index, gen, credits);
                sh.run_chan(chan, rd);
                sh.after_change();
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => MigrationError::Timeout {
                what: "a channel's rebind",
                after: timeout,
            },
        };
        // With no channel left, a peer that refuses connections or the bind
        // is gone for this session.
        let definitive = matches!(
            &e,
            MigrationError::RemoteAbort { .. } | MigrationError::Unauthenticated(_)
        ) || matches!(&e, MigrationError::Io { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused);
        tracing::debug!(channel = %index, error = %e, "rebind failed");
        let again =
            sh.m.lock()
                .unwrap()
                .handle_rebind_failed(index, definitive, e.to_string());
        if !again {
            sh.changed.notify_one();
            return;
        }
        tokio::select! {
            _ = sh.cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Runs the machine's timer: silent connections die, idle ones get a
/// keepalive, a session with every channel dead too long gives up.
async fn supervisor(sh: Arc<Shared>) {
    loop {
        let next = sh.m.lock().unwrap().poll_timeout();
        let Some(next) = next else { return };
        tokio::select! {
            _ = sh.cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
        let tx = sh.tx_bytes();
        let dead: Vec<(ChannelId, u32)> = (0..sh.channels())
            .map(|i| sh.chan(ChannelId(i)))
            .filter(|c| !c.dead.is_cancelled())
            .map(|c| (c.index, c.gen))
            .collect();
        sh.m.lock().unwrap().handle_timeout(Instant::now(), &tx);
        // Connections the machine declared dead stop their tasks.
        for (i, gen) in dead {
            let current = sh.m.lock().unwrap().is_live(i, gen);
            if !current {
                let chan = sh.chan(i);
                if chan.gen == gen {
                    tracing::warn!(
                        channel = %i,
                        "channel silent past the peer timeout; it rebinds"
                    );
                    chan.dead.cancel();
                }
            }
        }
        sh.after_change();
    }
}
