//! The source driver: connects the channels, runs the pre-copy rounds, switches
//! over and hands the guest off.
//!
//! Each channel has a writer task (take a batch job, encode it on the blocking
//! pool, wait for the channel's credit and the shared bandwidth cap, write) and
//! a reader task (acknowledgements and hand-off replies). Jobs come from one
//! shared queue, so a channel that is free takes the next batch: every channel
//! stays busy. A round ends when every one of its batches is acknowledged, which
//! also orders rounds: no page of round `r + 1` can be applied before its
//! round-`r` copy.

use super::policy::{Convergence, Decision, RoundStats};
use super::progress::{Phase, RunContext};
use super::report::{
    round3, CpuMs, MemoryUse, Outcome, PageCounter, PageCounts, Report, RoundLog, Side,
};
use super::{MigratableGuest, MigrationConfig, MigrationError};
use crate::codec::{AutoChooser, Codec, CodecChoice, CodecId, SocketRate, SETUP_CODEC_AUTO};
use crate::digest::{full_digest, page_hash, zero_page_hash, PageHashes};
use crate::memory::{DirtySnapshot, PAGE_SIZE};
use crate::transport::{connect, Conn, FrameReader, FrameWriter, TokenBucket};
use crate::wire::{
    Abort, BatchEncoder, ChannelBind, Command, EncodedBatch, Header, Limits, Message, Negotiate,
    RoundEnd, SessionSetup, Switchover, VerifyMode, FLAG_RESEND, MAX_CREDITS, MAX_RUNS_PER_BATCH,
    SETUP_FRAME_MAC, SETUP_LEAVE_PAUSED, VERSION,
};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One batch to send: a round and up to a batch of page runs.
#[derive(Debug)]
struct Job {
    round: u32,
    runs: Vec<(u64, u32)>,
}

/// Work for a channel's writer.
#[derive(Debug)]
enum Work {
    /// A batch sent for the first time.
    New(Job),
    /// A batch whose channel failed before it was acknowledged: encoded
    /// again from the same pages and sent under its message id, flagged as a
    /// resend (the destination applies each id once).
    Again(u64, Job),
}

/// Something the channel tasks tell the driver.
#[derive(Debug)]
enum Event {
    Reply(Message),
    Failed(MigrationError),
}

/// One channel's current connection; a rebind replaces it with the next
/// generation under the same channel number.
struct Chan {
    index: u16,
    gen: u32,
    writer: tokio::sync::Mutex<FrameWriter>,
    /// Bytes its socket took (moves while the peer reads).
    tx_progress: Arc<AtomicU64>,
    credits: Semaphore,
    /// Fired once, when the connection is declared dead.
    dead: CancellationToken,
    /// When it was bound and when it last received a frame, ms since
    /// `Shared::epoch`.
    born_ms: u64,
    last_rx_ms: AtomicU64,
    /// Batches in flight on it.
    outstanding: AtomicU64,
    /// A keepalive awaits its echo.
    echo_pending: AtomicBool,
}

impl Chan {
    fn new(
        index: u16,
        gen: u32,
        wr: FrameWriter,
        credits: u16,
        session: &CancellationToken,
        now_ms: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            index,
            gen,
            tx_progress: wr.progress(),
            writer: tokio::sync::Mutex::new(wr),
            credits: Semaphore::new(credits.into()),
            dead: session.child_token(),
            born_ms: now_ms,
            last_rx_ms: AtomicU64::new(now_ms),
            outstanding: AtomicU64::new(0),
            echo_pending: AtomicBool::new(false),
        })
    }
}

/// A batch sent and not yet acknowledged: where it went and what it holds.
struct Inflight {
    chan: u16,
    gen: u32,
    job: Job,
    pages: u32,
    bytes: usize,
}

/// The latest control message: sent again on another channel when its
/// channel fails before it was answered.
struct LastControl {
    id: u64,
    msg: Message,
    chan: u16,
    gen: u32,
    answered: bool,
    resend: bool,
}

/// What it takes to connect a channel and bind it to the session.
struct Connector {
    target: String,
    buckets: Vec<Arc<TokenBucket>>,
    wire: Arc<AtomicU64>,
    rx_bytes: Arc<AtomicU64>,
    session_id: u64,
    secret: Arc<super::auth::BindSecret>,
    tls: Option<crate::transport::tls::TlsClient>,
    /// Keyed without TLS: every frame after a bind's response is tagged.
    frame_mac: bool,
}

impl Connector {
    /// Connects channel `ch` (TLS when asked); returns its halves and its
    /// TLS keying material (empty when plain).
    async fn connect(
        &self,
        ch: u16,
    ) -> Result<(FrameReader, FrameWriter, Vec<u8>), MigrationError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect(&self.target))
            .await
            .map_err(|_| MigrationError::Timeout {
                what: "the TCP connection",
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|e| {
                MigrationError::io(format!("connect channel {ch} to {}", self.target), e)
            })?;
        let (conn, binding) = match &self.tls {
            None => (Conn::Plain(stream), Vec::new()),
            Some(tls) => {
                let (s, b) = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(stream))
                    .await
                    .map_err(|_| MigrationError::Timeout {
                        what: "the TLS handshake",
                        after: CONNECT_TIMEOUT,
                    })?
                    .map_err(|e| {
                        MigrationError::Incompatible(format!(
                            "channel {ch} to {}: {e} (does the receiver run with --tls?)",
                            self.target
                        ))
                    })?;
                (Conn::Tls(Box::new(s)), b.to_vec())
            }
        };
        let (rd, wr) = conn.split(
            ch,
            self.rx_bytes.clone(),
            self.buckets.clone(),
            self.wire.clone(),
        );
        Ok((rd, wr, binding))
    }

    /// Connects channel `ch` and binds it to the session, each side proving
    /// the session's secret over a fresh nonce. Returns its credits.
    async fn bind(&self, ch: u16) -> Result<(FrameReader, FrameWriter, u16), MigrationError> {
        let (mut rd, mut wr, binding) = self.connect(ch).await?;
        let header = Header {
            session_id: self.session_id,
            channel: ch,
            ..Header::new(Command::ChannelBind)
        };
        let nonce = super::auth::random_bytes::<16>();
        let bind = super::auth::Bind {
            session_id: self.session_id,
            channel: ch,
            nonce: &nonce,
            binding: &binding,
        };
        let proof = self.secret.bind_proof(&bind);
        wr.send(header, &Message::ChannelBind(ChannelBind { nonce, proof }))
            .await?;
        match handshake_read(&mut rd, "CHANNEL_BIND_RESPONSE").await? {
            (h, Message::ChannelBindResponse(r)) => {
                if !self.secret.verify_bound(&bind, h.credit_grant, &r.proof) {
                    return Err(MigrationError::Unauthenticated(format!(
                        "the destination's answer to the bind of channel {ch} does not prove the session's secret"
                    )));
                }
                if self.frame_mac {
                    let conn = super::auth::Connection::Bind(ch, &nonce);
                    let keys = self.secret.frame_keys(self.session_id, conn);
                    rd.authenticate(keys.to_source);
                    wr.authenticate(keys.to_dest);
                }
                let credits = h.credit_grant;
                if credits == 0 || credits > MAX_CREDITS {
                    return Err(MigrationError::Protocol(format!(
                        "channel {ch} granted {credits} credits"
                    )));
                }
                Ok((rd, wr, credits))
            }
            (_, m) => Err(MigrationError::Protocol(format!(
                "expected CHANNEL_BIND_RESPONSE, got {:?}",
                m.command()
            ))),
        }
    }
}

struct Shared {
    guest: Arc<dyn MigratableGuest>,
    hashes: PageHashes,
    codec: CodecChoice,
    /// With `auto`: the chooser, and the link's rate as the sockets show it
    /// when no cap sets the link.
    chooser: Mutex<AutoChooser>,
    capped: bool,
    socket_bps: Mutex<SocketRate>,
    session_id: u64,
    next_msg: AtomicU64,
    jobs: tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>,
    /// Batches to send again (before new ones), and its wake-up.
    again: Mutex<VecDeque<Work>>,
    work_ready: Notify,
    /// Each channel's current connection, and the wake-up when one is bound.
    chans: Vec<RwLock<Arc<Chan>>>,
    chan_bound: Notify,
    /// Batches sent and not yet acknowledged, by message id.
    inflight: Mutex<HashMap<u64, Inflight>>,
    acked: watch::Sender<u64>,
    counts: PageCounter,
    ctx: RunContext,
    events: mpsc::UnboundedSender<Event>,
    cancel: CancellationToken,
    /// Control messages go out one at a time, in order.
    control: tokio::sync::Mutex<()>,
    last_control: Mutex<Option<LastControl>>,
    control_lost: Notify,
    connector: Connector,
    epoch: Instant,
    peer_timeout: Duration,
    /// Since when no channel is alive.
    all_dead_since: Mutex<Option<Instant>>,
    /// Why the session gave up on its channels, once it has.
    gave_up: Mutex<Option<String>>,
    gave_up_now: CancellationToken,
    failures: AtomicU32,
    resent: AtomicU64,
    rebinds: AtomicU32,
}

thread_local! {
    static ENCODER: RefCell<BatchEncoder> = RefCell::new(BatchEncoder::new());
    /// A probe's sample of pages, and the compressors' output.
    static PROBE: RefCell<(Vec<u8>, bytes::BytesMut)> = RefCell::new((Vec::new(), bytes::BytesMut::new()));
    /// Whether this thread's compressors and probe buffers exist yet.
    static PROBE_WARM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn chan(&self, index: u16) -> Arc<Chan> {
        self.chans[index as usize].read().unwrap().clone()
    }

    /// The channels alive now, lowest number first.
    fn live(&self) -> Vec<Arc<Chan>> {
        (0..self.chans.len() as u16)
            .map(|i| self.chan(i))
            .filter(|c| !c.dead.is_cancelled())
            .collect()
    }

    /// Makes a bound connection channel `index`'s current one and starts its
    /// reader and writer.
    fn install(
        self: &Arc<Self>,
        index: u16,
        gen: u32,
        rd: FrameReader,
        wr: FrameWriter,
        credits: u16,
    ) {
        let chan = Chan::new(index, gen, wr, credits, &self.cancel, self.now_ms());
        *self.chans[index as usize].write().unwrap() = chan.clone();
        *self.all_dead_since.lock().unwrap() = None;
        self.start(chan, rd);
        self.chan_bound.notify_waiters();
    }

    /// Starts a connection's reader and writer.
    fn start(self: &Arc<Self>, chan: Arc<Chan>, rd: FrameReader) {
        tokio::spawn(reader_task(self.clone(), chan.clone(), rd));
        tokio::spawn(writer_task(self.clone(), chan));
    }

    /// Declares a channel's connection dead: its unacknowledged batches go
    /// back to the queue for the other channels, an unanswered control
    /// message is sent again, and the channel rebinds.
    fn fail_channel(self: &Arc<Self>, chan: &Arc<Chan>, e: MigrationError) {
        if self.cancel.is_cancelled() {
            return;
        }
        let moved = {
            let mut inflight = self.inflight.lock().unwrap();
            if chan.dead.is_cancelled() {
                return;
            }
            // Under the lock: no ack from this connection is counted after.
            chan.dead.cancel();
            let ids: Vec<u64> = inflight
                .iter()
                .filter(|(_, b)| b.chan == chan.index && b.gen == chan.gen)
                .map(|(&id, _)| id)
                .collect();
            let mut again = self.again.lock().unwrap();
            for id in &ids {
                let b = inflight.remove(id).expect("listed");
                again.push_back(Work::Again(*id, b.job));
            }
            ids.len()
        };
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.resent.fetch_add(moved as u64, Ordering::Relaxed);
        self.work_ready.notify_waiters();
        if let Some(c) = self.last_control.lock().unwrap().as_mut() {
            if !c.answered && c.chan == chan.index && c.gen == chan.gen {
                c.resend = true;
                self.control_lost.notify_one();
            }
        }
        if self.live().is_empty() {
            self.all_dead_since
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
        }
        tracing::warn!(
            channel = chan.index,
            error = %e,
            resent = moved,
            "channel failed; its batches go to the other channels while it rebinds"
        );
        tokio::spawn(rebind_task(self.clone(), chan.index, chan.gen + 1));
    }

    /// The next batch for `chan`: one to send again first, else a new one;
    /// `None` when the channel or the session ends.
    async fn next_work(&self, chan: &Chan) -> Option<Work> {
        loop {
            if let Some(w) = self.again.lock().unwrap().pop_front() {
                return Some(w);
            }
            let ready = self.work_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(w) = self.again.lock().unwrap().pop_front() {
                return Some(w);
            }
            tokio::select! {
                biased;
                _ = chan.dead.cancelled() => return None,
                _ = &mut ready => continue,
                job = async { self.jobs.lock().await.recv().await } => return job.map(Work::New),
            }
        }
    }

    /// Puts work back at the head of the queue (its channel died before it
    /// was sent).
    fn requeue(&self, w: Work) {
        self.again.lock().unwrap().push_front(w);
        self.work_ready.notify_waiters();
    }

    /// The lowest-numbered live channel, waiting for a rebind when none is.
    async fn wait_live(&self) -> Result<Arc<Chan>, MigrationError> {
        loop {
            let bound = self.chan_bound.notified();
            tokio::pin!(bound);
            bound.as_mut().enable();
            if let Some(c) = self.live().into_iter().next() {
                return Ok(c);
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return Err(MigrationError::Cancelled),
                _ = self.gave_up_now.cancelled() => return Err(self.lost_error()),
                _ = &mut bound => {}
            }
        }
    }

    /// Gives up on the session's channels: every one is lost and none can
    /// rebind. Whoever waits for a channel, and the driver, learn why.
    fn give_up(&self, why: String) {
        {
            let mut g = self.gave_up.lock().unwrap();
            if g.is_some() {
                return;
            }
            *g = Some(why);
        }
        self.gave_up_now.cancel();
        let _ = self.events.send(Event::Failed(self.lost_error()));
    }

    fn lost_error(&self) -> MigrationError {
        MigrationError::SessionLost(
            self.gave_up
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_else(|| "every channel is lost".into()),
        )
    }

    /// The codec for the next batch, and whether to probe the other candidates
    /// on its pages (`auto` only).
    fn choose(&self) -> (Codec, Option<[bool; 4]>) {
        match self.codec {
            CodecChoice::Fixed(c) => (c, None),
            CodecChoice::Auto => {
                let mut chooser = self.chooser.lock().unwrap();
                if !self.capped {
                    if let Some(bps) = self.socket_bps.lock().unwrap().rate() {
                        chooser.set_link_rate(bps);
                    }
                }
                let (codec, probe) = chooser.pick();
                tracing::trace!(%codec, probe, link = ?chooser.link_rate(), "auto picked");
                let set = crate::codec::CANDIDATES.map(|c| chooser.probes(c));
                (codec, probe.then_some(set))
            }
        }
    }

    /// Copies, classifies and hashes the pages of a job and encodes the batch
    /// with `codec` (probing the other candidates when `probe`).
    fn encode(
        &self,
        job: &Job,
        codec: Codec,
        probe: Option<[bool; 4]>,
    ) -> Result<EncodedBatch, MigrationError> {
        let mem = self.guest.memory();
        let zero_hash = zero_page_hash();
        ENCODER.with(|e| {
            let mut enc = e.borrow_mut();
            // Only auto times batches. CPU time, not wall: with more encoders
            // than cores a batch waits for a core, and wall time would make
            // every codec look slower.
            let t = (self.codec == CodecChoice::Auto).then(crate::cpu::CpuTimer::start);
            let batch = enc.encode(job.round, codec, &job.runs, |page, buf| {
                // Checked in place first: a zero page (a third of a typical
                // guest) is then never copied. A write racing the check or the
                // copy marks the page dirty, so it is sent again either way.
                let zero = mem.read_page_unless_zero(page, buf);
                self.hashes
                    .set(page, if zero { zero_hash } else { page_hash(buf) });
                zero
            })?;
            if let Some(t) = t {
                let secs = t.secs();
                let guest = u64::from(batch.pages) * PAGE_SIZE as u64;
                let nonzero = u64::from(batch.pages - batch.zero) * PAGE_SIZE as u64;
                // Measure every compressor on a sample of these pages.
                let mut samples = Vec::new();
                let mut sampled = 0;
                if let Some(set) = probe {
                    PROBE.with(|cell| {
                        let (sample, out) = &mut *cell.borrow_mut();
                        enc.sample_into(&batch, crate::codec::PROBE_BYTES, sample);
                        sampled = sample.len() as u64;
                        if sample.is_empty() {
                            return;
                        }
                        let compressors = crate::codec::CANDIDATES
                            .iter()
                            .zip(set)
                            .filter(|&(&c, wanted)| c != Codec::None && wanted)
                            .map(|(c, _)| c);
                        // A thread's first compression of each kind builds its
                        // context and faults its buffers in: a one-off cost
                        // that would make a codec look several times slower
                        // than it is. Pay it untimed.
                        if !PROBE_WARM.replace(true) {
                            for &c in crate::codec::CANDIDATES
                                .iter()
                                .filter(|&&c| c != Codec::None)
                            {
                                out.clear();
                                let _ = crate::codec::compress(c, sample, out);
                            }
                        }
                        for &c in compressors {
                            out.clear();
                            let t = crate::cpu::CpuTimer::start();
                            if let Ok(n) = crate::codec::compress(c, sample, out) {
                                samples.push((c, n as u64, t.secs()));
                            }
                        }
                    });
                }
                let mut chooser = self.chooser.lock().unwrap();
                chooser.record_batch(codec, guest, nonzero, batch.data_bytes as u64, secs);
                for (c, n, secs) in samples {
                    chooser.record_sample(c, sampled, n, secs);
                }
            }
            Ok(batch)
        })
    }

    /// Records how fast a channel's socket took a frame (no cap in the way).
    fn record_socket(&self, bytes: usize, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        if self.capped || self.codec != CodecChoice::Auto || secs <= 0.0 || bytes < 64 << 10 {
            return;
        }
        self.socket_bps
            .lock()
            .unwrap()
            .record(secs, self.chans.len(), std::time::Instant::now());
    }

    /// Records that the destination acknowledged a frame of `bytes`.
    fn record_ack(&self, bytes: usize) {
        if !self.capped && self.codec == CodecChoice::Auto {
            self.socket_bps.lock().unwrap().record_ack(bytes as f64);
        }
    }

    /// Sends a control message on the lowest-numbered live channel, moving
    /// to another (and marking it a resend) when that one fails.
    async fn send_control(self: &Arc<Self>, msg: &Message) -> Result<(), MigrationError> {
        let _order = self.control.lock().await;
        let id = self.next_msg.fetch_add(1, Ordering::Relaxed);
        self.send_control_locked(id, msg, false).await
    }

    async fn send_control_locked(
        self: &Arc<Self>,
        id: u64,
        msg: &Message,
        mut resend: bool,
    ) -> Result<(), MigrationError> {
        // A control message of the last one's channel lost goes again first,
        // so the destination sees them in order.
        self.resend_lost_control().await?;
        loop {
            let chan = self.wait_live().await?;
            let header = Header {
                message_id: id,
                session_id: self.session_id,
                flags: if resend { FLAG_RESEND } else { 0 },
                ..Header::new(msg.command())
            };
            let sent = tokio::select! {
                biased;
                _ = chan.dead.cancelled() => Err(MigrationError::ChannelLost { channel: chan.index, why: "failed while sending a control message".into() }),
                r = async { chan.writer.lock().await.send(header, msg).await } => r,
            };
            match sent {
                Ok(()) => {
                    *self.last_control.lock().unwrap() = Some(LastControl {
                        id,
                        msg: msg.clone(),
                        chan: chan.index,
                        gen: chan.gen,
                        answered: false,
                        resend: false,
                    });
                    // Failed just after the write: its failure missed it.
                    if !chan.dead.is_cancelled() {
                        return Ok(());
                    }
                }
                Err(e) => {
                    if !e.is_channel_loss() {
                        return Err(e);
                    }
                    self.fail_channel(&chan, e);
                }
            }
            resend = true;
        }
    }

    /// Sends the last control message again if its channel failed before
    /// the destination answered it. Call with `control` held.
    async fn resend_lost_control(self: &Arc<Self>) -> Result<(), MigrationError> {
        let lost = {
            let mut last = self.last_control.lock().unwrap();
            match last.as_mut() {
                Some(c) if c.resend && !c.answered => {
                    c.resend = false;
                    Some((c.id, c.msg.clone()))
                }
                _ => None,
            }
        };
        if let Some((id, msg)) = lost {
            tracing::info!(command = ?msg.command(), "sending a control message again on another channel");
            Box::pin(self.send_control_locked(id, &msg, true)).await?;
        }
        Ok(())
    }
}

async fn writer_task(sh: Arc<Shared>, chan: Arc<Chan>) {
    let run = async {
        while let Some(work) = sh.next_work(&chan).await {
            let (id, job) = match work {
                Work::New(job) => (None, job),
                Work::Again(id, job) => (Some(id), job),
            };
            // Raw batches cost a copy and a hash (about 0.1 ms per MiB): cheaper
            // here than a hop to the blocking pool and back. Compression takes
            // milliseconds and goes to the pool, off the runtime's workers.
            let (codec, probe) = match id {
                // A resend is no sample of anything.
                Some(_) => (sh.choose().0, None),
                None => sh.choose(),
            };
            let (batch, job) = if codec == Codec::None && probe.is_none() {
                (sh.encode(&job, codec, probe)?, job)
            } else {
                let sh2 = sh.clone();
                tokio::task::spawn_blocking(move || (sh2.encode(&job, codec, probe), job))
                    .await
                    .map(|(b, job)| b.map(|b| (b, job)))
                    .map_err(|e| MigrationError::Protocol(format!("encoder task failed: {e}")))??
            };
            let back = |job| match id {
                Some(id) => Work::Again(id, job),
                None => Work::New(job),
            };
            tokio::select! {
                biased;
                _ = chan.dead.cancelled() => {
                    sh.requeue(back(job));
                    return Ok(());
                }
                permit = chan.credits.acquire() => permit.expect("semaphore never closed").forget(),
            }
            let message_id = id.unwrap_or_else(|| sh.next_msg.fetch_add(1, Ordering::Relaxed));
            {
                let mut inflight = sh.inflight.lock().unwrap();
                if chan.dead.is_cancelled() {
                    drop(inflight);
                    sh.requeue(back(job));
                    return Ok(());
                }
                // From here a failure of the channel sends it again.
                inflight.insert(
                    message_id,
                    Inflight {
                        chan: chan.index,
                        gen: chan.gen,
                        job,
                        pages: batch.pages,
                        bytes: batch.payload.len(),
                    },
                );
                chan.outstanding.fetch_add(1, Ordering::Relaxed);
            }
            let header = Header {
                channel: chan.index,
                credit_request: 1,
                message_id,
                session_id: sh.session_id,
                flags: if id.is_some() { FLAG_RESEND } else { 0 },
                ..Header::new(Command::PageBatch)
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
                    let t = std::time::Instant::now();
                    writer.send_raw(&header, &batch.payload).await.map(|()| t.elapsed())
                } => r,
            };
            match sent {
                Ok(elapsed) => sh.record_socket(batch.payload.len(), elapsed),
                Err(e) if e.is_channel_loss() => {
                    sh.fail_channel(&chan, e);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            sh.counts.add(
                batch.pages.into(),
                batch.zero.into(),
                batch.raw.into(),
                batch.compressed.into(),
            );
        }
        Ok(())
    };
    let result: Result<(), MigrationError> = run.await;
    if let Err(e) = result {
        let _ = sh.events.send(Event::Failed(e));
    }
}

async fn reader_task(sh: Arc<Shared>, chan: Arc<Chan>, mut rd: FrameReader) {
    let ch = chan.index;
    let result: Result<(), MigrationError> = async {
        loop {
            let frame = tokio::select! {
                biased;
                _ = chan.dead.cancelled() => return Ok(()),
                f = rd.read_frame() => f?,
            };
            let Some(frame) = frame else {
                return Err(MigrationError::PeerClosed { channel: ch });
            };
            chan.last_rx_ms.store(sh.now_ms(), Ordering::Relaxed);
            match Message::decode(&frame.header, frame.payload, Limits::BEFORE_SETUP)? {
                Message::BatchAck(ack) => {
                    let (pages, bytes) = {
                        let mut inflight = sh.inflight.lock().unwrap();
                        if chan.dead.is_cancelled() {
                            // Its batches were sent again: their acks count.
                            return Ok(());
                        }
                        match inflight.get(&ack.message_id) {
                            Some(b) if b.chan == ch && b.gen == chan.gen => {}
                            _ => {
                                return Err(MigrationError::Protocol(format!(
                                "acknowledgement on channel {ch} of batch {} not in flight on it",
                                ack.message_id
                            )))
                            }
                        }
                        let b = inflight.remove(&ack.message_id).expect("checked");
                        chan.outstanding.fetch_sub(1, Ordering::Relaxed);
                        (b.pages, b.bytes)
                    };
                    let grant = frame.header.credit_grant;
                    let sem = &chan.credits;
                    if sem.available_permits() + usize::from(grant) > usize::from(MAX_CREDITS) {
                        return Err(MigrationError::Protocol(format!(
                            "credit grant of {grant} on channel {ch} exceeds {MAX_CREDITS}"
                        )));
                    }
                    sem.add_permits(grant.into());
                    sh.ctx
                        .progress
                        .pages_acked
                        .fetch_add(pages.into(), Ordering::Relaxed);
                    sh.acked.send_modify(|n| *n += 1);
                    sh.record_ack(bytes);
                }
                Message::EchoResponse(_) => chan.echo_pending.store(false, Ordering::Relaxed),
                m @ (Message::Ready(_) | Message::Complete(_) | Message::Abort(_)) => {
                    if let Some(c) = sh.last_control.lock().unwrap().as_mut() {
                        c.answered = true;
                    }
                    let _ = sh.events.send(Event::Reply(m));
                }
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "unexpected {:?} from the destination",
                        other.command()
                    )))
                }
            }
        }
    }
    .await;
    match result {
        Ok(()) => {}
        Err(e) if e.is_channel_loss() => sh.fail_channel(&chan, e),
        Err(e) => {
            if !sh.cancel.is_cancelled() {
                let _ = sh.events.send(Event::Failed(e));
            }
        }
    }
}

/// Connects channel `index` again and binds it to the session as
/// generation `gen`, with backoff, until it is bound or the session ends.
async fn rebind_task(sh: Arc<Shared>, index: u16, gen: u32) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt = tokio::select! {
            _ = sh.cancel.cancelled() => return,
            r = tokio::time::timeout(sh.peer_timeout, sh.connector.bind(index)) => r,
        };
        let e = match attempt {
            Ok(Ok((rd, wr, credits))) => {
                sh.rebinds.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    channel = index,
                    generation = gen,
                    "channel rebound to the session"
                );
                sh.install(index, gen, rd, wr, credits);
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => MigrationError::Timeout {
                what: "a channel's rebind",
                after: sh.peer_timeout,
            },
        };
        // With no channel left, a peer that refuses connections or the bind
        // is gone for this session.
        let definitive = matches!(
            &e,
            MigrationError::RemoteAbort { .. } | MigrationError::Unauthenticated(_)
        ) || matches!(&e, MigrationError::Io { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused);
        tracing::debug!(channel = index, error = %e, "rebind failed");
        if definitive && sh.live().is_empty() {
            sh.give_up(format!(
                "every channel is lost and none can rebind (channel {index}: {e})"
            ));
            return;
        }
        tokio::select! {
            _ = sh.cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Watches the channels: a channel that owes an answer and has heard and
/// sent nothing for the peer timeout is dead; an idle one gets a keepalive;
/// a lost control message goes again; with every channel dead for the peer
/// timeout, the migration fails.
async fn supervisor(sh: Arc<Shared>) {
    let timeout = sh.peer_timeout.as_millis() as u64;
    let tick = (sh.peer_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    // Each connection's last socket progress seen, and when it moved.
    let mut moved: HashMap<(u16, u32), (u64, u64)> = HashMap::new();
    loop {
        tokio::select! {
            _ = sh.cancel.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
            _ = sh.control_lost.notified() => {}
        }
        let now = sh.now_ms();
        for chan in sh.live() {
            let progress = chan.tx_progress.load(Ordering::Relaxed);
            let m = moved
                .entry((chan.index, chan.gen))
                .or_insert((progress, chan.born_ms));
            if m.0 != progress {
                *m = (progress, now);
            }
            let heard = chan.last_rx_ms.load(Ordering::Relaxed).max(m.1);
            let owed = chan.outstanding.load(Ordering::Relaxed) > 0
                || chan.echo_pending.load(Ordering::Relaxed);
            let quiet = now.saturating_sub(heard);
            // Keepalives at least every 3 s: receivers give up on a source
            // silent for their own timeout (10 s by default).
            let keepalive = (timeout / 3).min(3000);
            if owed && quiet > timeout {
                sh.fail_channel(
                    &chan,
                    MigrationError::ChannelLost {
                        channel: chan.index,
                        why: format!("the peer was silent for {:?}", sh.peer_timeout),
                    },
                );
            } else if !owed && quiet > keepalive {
                chan.echo_pending.store(true, Ordering::Relaxed);
                let (sh, chan) = (sh.clone(), chan.clone());
                tokio::spawn(async move {
                    let header = Header {
                        session_id: sh.session_id,
                        message_id: sh.next_msg.fetch_add(1, Ordering::Relaxed),
                        ..Header::new(Command::Echo)
                    };
                    let echo = Message::Echo(crate::wire::Echo { value: sh.now_ms() });
                    let sent = tokio::select! {
                        _ = chan.dead.cancelled() => Ok(()),
                        r = async { chan.writer.lock().await.send(header, &echo).await } => r,
                    };
                    if let Err(e) = sent {
                        sh.fail_channel(&chan, e);
                    }
                });
            }
        }
        moved.retain(|&(i, g), _| sh.chan(i).gen == g);
        let lost = sh
            .last_control
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|c| c.resend && !c.answered);
        if lost && !sh.live().is_empty() {
            let sh2 = sh.clone();
            tokio::spawn(async move {
                let _order = sh2.control.lock().await;
                if let Err(e) = sh2.resend_lost_control().await {
                    let _ = sh2.events.send(Event::Failed(e));
                }
            });
        }
        let dead_since = *sh.all_dead_since.lock().unwrap();
        if let Some(since) = dead_since {
            if sh.live().is_empty() && since.elapsed() > sh.peer_timeout {
                sh.give_up(format!(
                    "every channel is lost and none rebound within {:?}",
                    sh.peer_timeout
                ));
                return;
            }
        }
    }
}

/// Reads one message during the handshake, with a timeout.
async fn handshake_read(
    rd: &mut FrameReader,
    what: &'static str,
) -> Result<(Header, Message), MigrationError> {
    let channel = rd.channel();
    // A receiver that refuses says why in an ABORT; one that closes or
    // resets the connection instead is named as such, with the OS's word.
    let closed = |detail: String| {
        MigrationError::ChannelLost {
        channel,
        why: format!(
            "the receiver closed the connection instead of sending {what} ({detail}); it gave no reason: its log says why"
        ),
    }
    };
    let frame = tokio::time::timeout(CONNECT_TIMEOUT, rd.read_frame())
        .await
        .map_err(|_| MigrationError::Timeout {
            what,
            after: CONNECT_TIMEOUT,
        })?
        .map_err(|e| match e {
            MigrationError::Io { context, source } => closed(format!("{context}: {source}")),
            e @ (MigrationError::PeerClosed { .. } | MigrationError::ChannelLost { .. }) => {
                closed(e.to_string())
            }
            e => e,
        })?
        .ok_or_else(|| closed("end of stream".into()))?;
    let msg = Message::decode(&frame.header, frame.payload, Limits::BEFORE_SETUP)?;
    if let Message::Abort(a) = msg {
        return Err(MigrationError::RemoteAbort {
            code: a.code,
            message: a.message,
        });
    }
    Ok((frame.header, msg))
}

/// What the driver counts besides the shared counters.
#[derive(Debug, Default)]
struct Tally {
    session_id: u64,
    setup: Duration,
    rounds: u32,
    downtime: Duration,
    verify: Duration,
    verified: bool,
    dirty_bytes: u64,
    dirty_time: Duration,
    throttle_max: u8,
    destination_cpu_ms: Option<f64>,
    go_sent: bool,
    paused: bool,
    counter_at_pause: Option<u64>,
    authenticated: bool,
    frames_authenticated: bool,
    channel_failures: u32,
    batches_resent: u64,
    channel_rebinds: u32,
    round_log: Vec<RoundLog>,
}

struct Driver {
    sh: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
    jobs: mpsc::UnboundedSender<Job>,
    queued: u64,
    batch_pages: u32,
    deadline: Instant,
    timeout: Duration,
    handoff: Duration,
}

impl Driver {
    /// Splits a dirty set into batch jobs and queues them. Returns the pages.
    fn enqueue(&mut self, snap: &DirtySnapshot, round: u32) -> u64 {
        let max = u64::from(self.batch_pages);
        let mut runs = Vec::new();
        let mut n = 0u64;
        let mut total = 0u64;
        for (mut first, mut len) in snap.runs() {
            while len > 0 {
                let take = len.min(max - n);
                runs.push((first, take as u32));
                n += take;
                first += take;
                len -= take;
                if n == max || runs.len() == MAX_RUNS_PER_BATCH as usize {
                    total += n;
                    self.push(round, std::mem::take(&mut runs));
                    n = 0;
                }
            }
        }
        if n > 0 {
            total += n;
            self.push(round, runs);
        }
        total
    }

    fn push(&mut self, round: u32, runs: Vec<(u64, u32)>) {
        self.queued += 1;
        // The receiver lives in Shared, which outlives the driver.
        let _ = self.jobs.send(Job { round, runs });
    }

    fn event_error(ev: Option<Event>) -> MigrationError {
        match ev {
            Some(Event::Failed(e)) => e,
            Some(Event::Reply(Message::Abort(a))) => MigrationError::RemoteAbort {
                code: a.code,
                message: a.message,
            },
            Some(Event::Reply(m)) => MigrationError::Protocol(format!(
                "unexpected {:?} before the hand-off",
                m.command()
            )),
            None => MigrationError::Protocol("all channel tasks ended".into()),
        }
    }

    /// A peer that aborts closes its channels right after: when a channel
    /// closes, look briefly for the abort that explains it.
    async fn explain(&mut self, ev: Option<Event>) -> MigrationError {
        if let Some(Event::Failed(MigrationError::PeerClosed { .. })) = &ev {
            let wait = tokio::time::sleep(Duration::from_millis(250));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    next = self.events.recv() => match next {
                        Some(Event::Reply(Message::Abort(a))) => {
                            return MigrationError::RemoteAbort { code: a.code, message: a.message }
                        }
                        Some(_) => continue,
                        None => break,
                    },
                }
            }
        }
        Self::event_error(ev)
    }

    /// Waits until every queued batch is acknowledged.
    async fn drain(&mut self, deadline: Option<Instant>) -> Result<(), MigrationError> {
        let mut acked = self.sh.acked.subscribe();
        let target = self.queued;
        let until = deadline.unwrap_or(self.deadline);
        let ev = tokio::select! {
            biased;
            _ = self.sh.ctx.cancel.cancelled() => return Err(MigrationError::Cancelled),
            ev = self.events.recv() => ev,
            r = acked.wait_for(|&n| n >= target) => {
                return r.map(|_| ()).map_err(|_| MigrationError::Protocol("ack counter closed".into()));
            }
            _ = tokio::time::sleep_until(until.into()) => return Err(match deadline {
                None => MigrationError::NotConverging(super::policy::GiveUp::CompletionTimeout(self.timeout)),
                Some(_) => MigrationError::Timeout { what: "the final pages to be applied", after: self.handoff },
            }),
        };
        Err(self.explain(ev).await)
    }

    /// Waits for a hand-off reply; an operator's cancel ends the wait.
    async fn reply(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Message, MigrationError> {
        self.await_reply(what, timeout, true).await
    }

    /// Waits for the answer to GO: no cancel ends this wait (the guest is
    /// the destination's from GO on), only the answer or the timeout.
    async fn reply_committed(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Message, MigrationError> {
        self.await_reply(what, timeout, false).await
    }

    async fn await_reply(
        &mut self,
        what: &'static str,
        timeout: Duration,
        cancellable: bool,
    ) -> Result<Message, MigrationError> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let ev = tokio::select! {
                biased;
                _ = self.sh.ctx.cancel.cancelled(), if cancellable => return Err(MigrationError::Cancelled),
                ev = self.events.recv() => ev,
                _ = tokio::time::sleep_until(until) => return Err(MigrationError::Timeout { what, after: timeout }),
            };
            return match ev {
                Some(Event::Reply(Message::Abort(a))) => Err(MigrationError::RemoteAbort {
                    code: a.code,
                    message: a.message,
                }),
                // A second READY: the answer to a SWITCHOVER sent again after
                // its channel failed, when the first answer got through too.
                Some(Event::Reply(Message::Ready(_))) if what != "READY" => continue,
                Some(Event::Reply(m)) => Ok(m),
                other => Err(self.explain(other).await),
            };
        }
    }
}

/// Migrates `guest` to the receiver at `target` (host:port). Always returns a
/// report; on any failure before GO the guest runs on the source again.
pub async fn migrate(
    guest: Arc<dyn MigratableGuest>,
    target: &str,
    config: &MigrationConfig,
    ctx: &RunContext,
) -> Report {
    let start = Instant::now();
    let mut tally = Tally::default();
    let counts = Arc::new(Mutex::new(PageCounts::default()));
    let result = match config.validate() {
        Err(e) => Err(MigrationError::Config(e.to_string())),
        Ok(()) => {
            run(
                guest.clone(),
                target,
                config,
                ctx,
                start,
                &mut tally,
                &counts,
            )
            .await
        }
    };
    let total = start.elapsed();
    let (outcome, error) = match &result {
        Ok(()) => (Outcome::Completed, None),
        Err(e) => {
            let outcome = if tally.go_sent {
                Outcome::Unresolved
            } else if matches!(e, MigrationError::Cancelled) || ctx.cancel.is_cancelled() {
                // A cancel may surface first as its consequence (the peer
                // closing a channel mid-write): it is still a cancel.
                Outcome::Cancelled
            } else {
                Outcome::Failed
            };
            let error = if outcome == Outcome::Cancelled {
                MigrationError::Cancelled.to_string()
            } else {
                e.to_string()
            };
            (outcome, Some(error))
        }
    };
    if outcome != Outcome::Completed && outcome != Outcome::Unresolved {
        // Nothing was handed over: the guest runs here, unthrottled.
        guest.set_throttle(0);
        if tally.paused {
            guest.resume();
        }
    }
    if let Err(e) = &result {
        tracing::warn!(error = %e, ?outcome, "migration did not complete");
    }
    ctx.progress.update(|s| s.phase = Phase::Done);
    let mut report = Report {
        side: Side::Source,
        outcome,
        error,
        guest_location: String::new(),
        verified: tally.verified,
        verify: config.verify,
        verify_ms: round3(tally.verify.as_secs_f64() * 1e3),
        memory_bytes: guest.memory().len_bytes(),
        pages: *counts.lock().unwrap(),
        rounds: tally.rounds,
        total_ms: round3(total.as_secs_f64() * 1e3),
        setup_ms: round3(tally.setup.as_secs_f64() * 1e3),
        downtime_ms: round3(tally.downtime.as_secs_f64() * 1e3),
        guest_bytes_sent: 0,
        wire_bytes: ctx.progress.wire_bytes.load(Ordering::Relaxed),
        compression_ratio: 0.0,
        throughput_guest_bps: 0.0,
        throughput_wire_bps: 0.0,
        dirty_rate_bps: if tally.dirty_time.is_zero() {
            0.0
        } else {
            (tally.dirty_bytes as f64 / tally.dirty_time.as_secs_f64()).round()
        },
        throttle_pct_max: tally.throttle_max,
        channels: config.channels,
        codec: config.codec.to_string(),
        max_bandwidth_bps: config.max_bandwidth,
        cpu_ms: CpuMs {
            source: Some(round3(ctx.cpu.total().as_secs_f64() * 1e3)),
            destination: tally.destination_cpu_ms,
        },
        guest: guest.kind(),
        guest_counter_at_pause: tally.counter_at_pause,
        guest_counter_after_resume: None,
        session_id: format!("{:016x}", tally.session_id),
        authenticated: tally.authenticated,
        encrypted: config.tls.is_some(),
        frames_authenticated: config.tls.is_some() || tally.frames_authenticated,
        channel_failures: tally.channel_failures,
        batches_resent: tally.batches_resent,
        channel_rebinds: tally.channel_rebinds,
        saved_to: None,
        round_log: std::mem::take(&mut tally.round_log),
        memory_use: MemoryUse::measure(Some(guest.memory())),
        guests_here: None,
    };
    report.finish_derived();
    report
}

async fn run(
    guest: Arc<dyn MigratableGuest>,
    target: &str,
    config: &MigrationConfig,
    ctx: &RunContext,
    start: Instant,
    tally: &mut Tally,
    counts_out: &Arc<Mutex<PageCounts>>,
) -> Result<(), MigrationError> {
    let memory_bytes = guest.memory().len_bytes();
    let pages = guest.memory().pages();
    let batch_pages = config.batch_pages();
    let own = config.max_bandwidth.map(|bps| {
        // Bursts of at most one batch (plus headers) or 10 ms at the rate.
        let batch = u64::from(batch_pages) * PAGE_SIZE as u64 + 4096;
        Arc::new(TokenBucket::new(bps, batch.max(bps / 100)))
    });
    // The migration's own cap, and the one it shares with others (a node's).
    let buckets: Vec<Arc<TokenBucket>> = own.into_iter().chain(ctx.shared_bucket.clone()).collect();
    let wire = ctx.progress.wire_bytes.clone();
    let rx_bytes = Arc::new(AtomicU64::new(0));
    ctx.progress.start_round(Phase::Setup, 0, 0);

    // Channel 0: negotiate and set up the session.
    let mut connector = Connector {
        target: target.to_string(),
        buckets,
        wire,
        rx_bytes,
        session_id: 0,
        secret: Arc::new(super::auth::BindSecret::derive(
            None, &[0; 16], &[0; 16], 0, &[0; 16],
        )),
        tls: config.tls.clone(),
        frame_mac: config.session_key.is_some() && config.tls.is_none(),
    };
    if config.tls.as_ref().is_some_and(|t| !t.is_pinned()) && config.session_key.is_none() {
        return Err(MigrationError::Config(
            "TLS without a pinned certificate needs a shared key to know the receiver by".into(),
        ));
    }
    let (mut rd0, mut wr0, binding0) = tokio::select! {
        biased;
        _ = ctx.cancel.cancelled() => return Err(MigrationError::Cancelled),
        c = connector.connect(0) => c?,
    };
    // With auto every codec may be used: the destination must decode them all.
    let needed = match config.codec {
        CodecChoice::Fixed(c) => c.id().bit() | CodecId::None.bit(),
        CodecChoice::Auto => CodecId::None.bit() | CodecId::Lz4.bit() | CodecId::Zstd.bit(),
    };
    let source_nonce = super::auth::random_bytes::<16>();
    wr0.send(
        Header::new(Command::Negotiate),
        &Message::Negotiate(Negotiate {
            min_version: VERSION,
            max_version: VERSION,
            capabilities: 0,
            codecs: needed,
            page_size: PAGE_SIZE as u32,
            nonce: source_nonce,
        }),
    )
    .await?;
    let nonce = match handshake_read(&mut rd0, "NEGOTIATE_RESPONSE").await? {
        (_, Message::NegotiateResponse(r)) => {
            if r.version != VERSION || r.page_size != PAGE_SIZE as u32 {
                return Err(MigrationError::Incompatible(format!(
                    "destination chose version {} and page size {}",
                    r.version, r.page_size
                )));
            }
            if r.codecs & needed != needed {
                return Err(MigrationError::Incompatible(format!(
                    "destination cannot decode {}",
                    config.codec
                )));
            }
            r.nonce
        }
        (_, m) => {
            return Err(MigrationError::Protocol(format!(
                "expected NEGOTIATE_RESPONSE, got {:?}",
                m.command()
            )))
        }
    };
    let (setup_codec, level) = match config.codec {
        CodecChoice::Fixed(Codec::Zstd { level }) => (CodecId::Zstd as u8, level as i8),
        CodecChoice::Fixed(c) => (c.id() as u8, 0),
        CodecChoice::Auto => (SETUP_CODEC_AUTO, 0),
    };
    let mut setup = SessionSetup {
        memory_bytes,
        channels: config.channels,
        codec: setup_codec,
        codec_level: level,
        guest_kind: guest.kind(),
        verify: config.verify,
        max_bandwidth: config.max_bandwidth.unwrap_or(0),
        flags: if config.leave_paused {
            SETUP_LEAVE_PAUSED
        } else {
            0
        } | if connector.frame_mac {
            SETUP_FRAME_MAC
        } else {
            0
        },
        label: config.label.clone(),
        proof: None,
    };
    let key = config.session_key.as_ref();
    let handshake = super::auth::Handshake {
        source_nonce: &source_nonce,
        dest_nonce: &nonce,
        binding: &binding0,
    };
    setup.proof = key.map(|k| super::auth::setup_proof(k, &handshake, &setup));
    wr0.send(
        Header::new(Command::SessionSetup),
        &Message::SessionSetup(setup),
    )
    .await?;
    let (header, setup) = match handshake_read(&mut rd0, "SESSION_SETUP_RESPONSE").await? {
        (h, Message::SessionSetupResponse(r)) => (h, r),
        (_, m) => {
            return Err(MigrationError::Protocol(format!(
                "expected SESSION_SETUP_RESPONSE, got {:?}",
                m.command()
            )))
        }
    };
    let session_id = header.session_id;
    tally.session_id = session_id;
    // With a key, the destination must prove it too before it sees a page.
    if let Some(k) = key {
        let proven = setup.proof.is_some_and(|p| {
            let r = super::auth::Response {
                session_id,
                token: &setup.bind_token,
                credits: setup.initial_credits,
            };
            super::auth::verify_response_proof(k, &handshake, &r, &p)
        });
        if !proven {
            let e = MigrationError::Unauthenticated(
                "the destination did not prove the shared key: not sending it the guest".into(),
            );
            tracing::warn!(%target, "{e}");
            return Err(e);
        }
        tally.authenticated = true;
    }
    connector.session_id = session_id;
    connector.secret = Arc::new(super::auth::BindSecret::derive(
        key,
        &source_nonce,
        &nonce,
        session_id,
        &setup.bind_token,
    ));
    if connector.frame_mac {
        let conn = super::auth::Connection::Setup(&source_nonce);
        let keys = connector.secret.frame_keys(session_id, conn);
        rd0.authenticate(keys.to_source);
        wr0.authenticate(keys.to_dest);
        tally.frames_authenticated = true;
    }
    let connector = Arc::new(connector);
    if setup.initial_credits == 0 || setup.initial_credits > MAX_CREDITS {
        return Err(MigrationError::Protocol(format!(
            "initial credits {} out of range",
            setup.initial_credits
        )));
    }

    // Channels 1..N bind to the session, concurrently.
    let mut binds = tokio::task::JoinSet::new();
    for ch in 1..config.channels {
        let connector = connector.clone();
        binds.spawn(async move { connector.bind(ch).await.map(|(rd, wr, c)| (ch, rd, wr, c)) });
    }
    let mut channels: Vec<Option<(FrameReader, FrameWriter, u16)>> =
        (0..config.channels).map(|_| None).collect();
    channels[0] = Some((rd0, wr0, setup.initial_credits));
    loop {
        let joined = tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => return Err(MigrationError::Cancelled),
            j = binds.join_next() => j,
        };
        let Some(joined) = joined else { break };
        let (ch, rd, wr, credits) =
            joined.map_err(|e| MigrationError::Protocol(format!("bind task failed: {e}")))??;
        channels[ch as usize] = Some((rd, wr, credits));
    }
    tally.setup = start.elapsed();

    // Start the channel tasks.
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    // The channels outlive an operator's cancel long enough to carry the
    // ABORT that tells the destination to discard its copy: the driver
    // watches `ctx.cancel`, and this ends the tasks when it returns.
    let cancel = CancellationToken::new();
    let _stop_tasks = cancel.clone().drop_guard();
    let mut readers = Vec::new();
    let mut slots = Vec::new();
    for (ch, c) in channels.into_iter().enumerate() {
        let (rd, wr, credits) = c.expect("every channel bound");
        readers.push(rd);
        slots.push(RwLock::new(Chan::new(
            ch as u16, 0, wr, credits, &cancel, 0,
        )));
    }
    let sh = Arc::new(Shared {
        guest: guest.clone(),
        hashes: PageHashes::new(pages),
        codec: config.codec,
        chooser: Mutex::new({
            // The chooser leaves the receiving side its share of the cores.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let mut c = AutoChooser::new(cores);
            let shared = ctx.shared_bucket.as_ref().map(|b| b.rate());
            if let Some(cap) = config.max_bandwidth.into_iter().chain(shared).min() {
                c.set_link_rate(cap as f64);
            }
            c
        }),
        capped: config.max_bandwidth.is_some() || ctx.shared_bucket.is_some(),
        socket_bps: Mutex::new(SocketRate::default()),
        session_id,
        next_msg: AtomicU64::new(1),
        jobs: tokio::sync::Mutex::new(jobs_rx),
        again: Mutex::new(VecDeque::new()),
        work_ready: Notify::new(),
        chans: slots,
        chan_bound: Notify::new(),
        inflight: Mutex::new(HashMap::new()),
        acked: watch::channel(0).0,
        counts: PageCounter::default(),
        ctx: ctx.clone(),
        events: events_tx,
        cancel: cancel.clone(),
        control: tokio::sync::Mutex::new(()),
        last_control: Mutex::new(None),
        control_lost: Notify::new(),
        connector: Arc::try_unwrap(connector)
            .unwrap_or_else(|_| unreachable!("the bind tasks have ended")),
        epoch: Instant::now(),
        peer_timeout: config.peer_timeout,
        all_dead_since: Mutex::new(None),
        gave_up: Mutex::new(None),
        gave_up_now: CancellationToken::new(),
        failures: AtomicU32::new(0),
        resent: AtomicU64::new(0),
        rebinds: AtomicU32::new(0),
    });
    for (ch, rd) in readers.into_iter().enumerate() {
        sh.start(sh.chan(ch as u16), rd);
    }
    tokio::spawn(supervisor(sh.clone()));
    let policy = config.policy(memory_bytes);
    let mut driver = Driver {
        sh: sh.clone(),
        events: events_rx,
        jobs: jobs_tx,
        queued: 0,
        batch_pages,
        // Far future rather than overflow (the range check bounds it anyway).
        deadline: start
            .checked_add(policy.completion_timeout)
            .unwrap_or(start + Duration::from_secs(30 * 86_400)),
        timeout: policy.completion_timeout,
        handoff: config.handoff_timeout,
    };
    let result = precopy_and_handoff(&mut driver, config, ctx, start, tally, policy).await;
    *counts_out.lock().unwrap() = sh.counts.snapshot();
    tally.channel_failures = sh.failures.load(Ordering::Relaxed);
    tally.batches_resent = sh.resent.load(Ordering::Relaxed);
    tally.channel_rebinds = sh.rebinds.load(Ordering::Relaxed);
    if let Err(e) = &result {
        if !tally.go_sent && !matches!(e, MigrationError::RemoteAbort { .. }) {
            // Tell the destination to discard its copy; best effort.
            let abort = Message::Abort(Abort {
                code: e.abort_code(),
                message: e.to_string(),
            });
            let _ = tokio::time::timeout(Duration::from_secs(1), sh.send_control(&abort)).await;
        }
    }
    cancel.cancel();
    for i in 0..sh.chans.len() as u16 {
        if let Ok(mut w) = sh.chan(i).writer.try_lock() {
            w.shutdown().await;
        }
    }
    result
}

async fn precopy_and_handoff(
    d: &mut Driver,
    config: &MigrationConfig,
    ctx: &RunContext,
    start: Instant,
    tally: &mut Tally,
    policy: super::policy::ConvergencePolicy,
) -> Result<(), MigrationError> {
    let guest = d.sh.guest.clone();
    let pages = guest.memory().pages();
    let mut conv = Convergence::new(policy);
    let mut snap = DirtySnapshot::all(pages);
    // Forget writes from before the migration: round 0 sends every page.
    let mut discard = DirtySnapshot::new();
    guest.snapshot_dirty(&mut discard);
    let mut round = 0u32;
    loop {
        let t0 = Instant::now();
        let n = d.enqueue(&snap, round);
        ctx.progress.start_round(Phase::Precopy, round, n);
        d.drain(None).await?;
        let duration = t0.elapsed();
        let dirty = guest.dirty_pages();
        let stats = RoundStats {
            round,
            elapsed: start.elapsed(),
            duration,
            bytes_sent: n * PAGE_SIZE as u64,
            dirty_bytes: dirty * PAGE_SIZE as u64,
        };
        tally.rounds = round + 1;
        tally.dirty_bytes += stats.dirty_bytes;
        tally.dirty_time += duration;
        let decision = conv.decide(&stats);
        if let Decision::Throttle(p) = decision {
            guest.set_throttle(p);
            tally.throttle_max = tally.throttle_max.max(p);
            tracing::info!(
                round,
                throttle_pct = p,
                "auto-converge: throttling the guest"
            );
        }
        let log = RoundLog {
            round,
            pages: n,
            ms: round3(duration.as_secs_f64() * 1e3),
            dirty_pages_after: dirty,
            throttle_pct: conv.throttle_pct(),
        };
        tally.round_log.push(log);
        ctx.progress.update(|s| {
            s.dirty_pages = dirty;
            s.throughput_bps = conv.throughput_bps().unwrap_or(0.0);
            s.expected_downtime_ms = conv
                .expected_downtime(stats.dirty_bytes)
                .map(|d| d.as_secs_f64() * 1e3);
            s.throttle_pct = conv.throttle_pct();
        });
        ctx.progress.round_done(log);
        tracing::debug!(round, pages = n, ?duration, dirty, ?decision, "round done");
        let final_next = match decision {
            Decision::GiveUp(g) => return Err(MigrationError::NotConverging(g)),
            Decision::Switchover => true,
            Decision::Continue | Decision::Throttle(_) => false,
        };
        d.sh.send_control(&Message::RoundEnd(RoundEnd {
            round,
            pages: n,
            final_next,
        }))
        .await?;
        round += 1;
        if final_next {
            break;
        }
        guest.snapshot_dirty(&mut snap);
    }

    // Switchover: pause, send the last dirty pages with every channel, the
    // state and the digest.
    let paused_at = Instant::now();
    guest.pause();
    tally.paused = true;
    tally.counter_at_pause = Some(guest.progress_counter());
    guest.set_throttle(0);
    guest.snapshot_dirty(&mut snap);
    let n = d.enqueue(&snap, round);
    ctx.progress.start_round(Phase::Switchover, round, n);
    let final_deadline = Instant::now() + config.handoff_timeout;
    d.drain(Some(final_deadline)).await?;
    let t = Instant::now();
    let digest = match config.verify {
        VerifyMode::Fast => d.sh.hashes.digest(),
        VerifyMode::Full => {
            let mem = guest.memory().clone();
            tokio::task::spawn_blocking(move || full_digest(&mem, 2))
                .await
                .map_err(|e| MigrationError::Protocol(format!("digest task failed: {e}")))?
        }
    };
    tally.verify = t.elapsed();
    let state = guest.save_state().map_err(MigrationError::Guest)?;
    d.sh.send_control(&Message::Switchover(Switchover {
        final_round: round,
        digest,
        verify: config.verify,
        rounds: tally.rounds,
        dirty_rate_bps: if tally.dirty_time.is_zero() {
            0
        } else {
            (tally.dirty_bytes as f64 / tally.dirty_time.as_secs_f64()) as u64
        },
        throttle_pct_max: tally.throttle_max,
        source_cpu_ms: ctx.cpu.total().as_millis() as u64,
        state: state.into(),
    }))
    .await?;
    ctx.progress.update(|s| s.phase = Phase::Handoff);
    match d.reply("READY", config.handoff_timeout).await? {
        Message::Ready(r) if r.digest == digest => tally.verified = true,
        Message::Ready(r) => {
            return Err(MigrationError::DigestMismatch {
                source_digest: digest,
                destination_digest: r.digest,
            })
        }
        m => {
            return Err(MigrationError::Protocol(format!(
                "expected READY, got {:?}",
                m.command()
            )))
        }
    }
    // A cancel that came first keeps the guest here; once committed, cancels
    // are refused and the hand-off finishes.
    if ctx.cancel.is_cancelled() || !ctx.progress.commit() {
        return Err(MigrationError::Cancelled);
    }
    // A step that must hold before the guest is handed over (a saved
    // guest's file marked consumed): failing, GO does not go out.
    if let Some(step) = &config.before_go {
        (step.0)().map_err(|e| MigrationError::Guest(format!("before GO: {e}")))?;
    }
    // From here on the source never resumes the guest.
    tally.go_sent = true;
    d.sh.send_control(&Message::Go).await?;
    match d
        .reply_committed("COMPLETE", config.handoff_timeout)
        .await?
    {
        Message::Complete(c) => {
            tally.downtime = paused_at.elapsed();
            tally.destination_cpu_ms = Some(c.destination_cpu_ms as f64);
        }
        m => {
            return Err(MigrationError::Protocol(format!(
                "expected COMPLETE, got {:?}",
                m.command()
            )))
        }
    }
    Ok(())
}
