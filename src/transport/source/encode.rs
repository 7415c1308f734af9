//! Encoding the source's batches: copy, classify and hash the pages, compress
//! them with the chosen codec, and (with `auto`) measure every candidate so
//! the chooser learns which wins on this link.

use crate::codec::{AutoChooser, Codec, CodecChoice, SocketRate, StreamEncoder, CANDIDATES};
use crate::digest::{page_hash, ref_tag, zero_page_hash, PageHashes};
use crate::memory::PAGE_SIZE;
use crate::migration::report::PageCounter;
use crate::migration::sent::SentIndex;
use crate::migration::source_machine::{BatchJob, Work};
use crate::migration::{MigratableGuest, MigrationError};
use crate::page::PageIndex;
use crate::page::PageRun;
use crate::wire::{BatchEncoder, EncodedBatch, Read};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What encoding needs, shared by the channels' writers.
pub(super) struct Encoder {
    pub guest: Arc<dyn MigratableGuest>,
    pub hashes: PageHashes,
    pub codec: CodecChoice,
    /// With `auto`: the chooser, and the link's rate as the sockets show it
    /// when no cap sets the link.
    pub chooser: Mutex<AutoChooser>,
    pub capped: bool,
    pub socket_bps: Mutex<SocketRate>,
    pub counts: PageCounter,
    /// Dense pages, when the destination takes references: the pages it
    /// holds, by content, and the key of the references' tags.
    pub sent: Option<(SentIndex, [u8; 32])>,
    /// This encoder among the process's ([`new_encoder_id`]).
    pub id: u64,
    /// Under a cap shared with other migrations (a node's): the migration's
    /// own cap, if any, and its place among the bucket's users, so `auto`
    /// counts on its share of the link.
    pub shared: Option<(Option<u64>, crate::transport::BucketUser)>,
}

/// Which candidates a probe measures.
type Probe = [bool; CANDIDATES.len()];

/// A connection's kept zstd stream, made by its first stream batch. Its
/// writer encodes one batch at a time, so the slot is never contended.
pub(super) type KeptStream = Arc<Mutex<Option<StreamEncoder>>>;

thread_local! {
    static ENCODER: RefCell<BatchEncoder> = RefCell::new(BatchEncoder::new());
    /// A probe's sample of pages, and the compressors' output.
    static PROBE: RefCell<(Vec<u8>, bytes::BytesMut)> = RefCell::new((Vec::new(), bytes::BytesMut::new()));
    /// Whether this thread's compressors and probe buffers exist yet.
    static PROBE_WARM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The [`Encoder::id`] whose samples this thread's probe streams hold.
    static PROBE_OWNER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Encoders made in this process so far.
static ENCODERS: AtomicU64 = AtomicU64::new(0);

/// A number no other encoder of this process has (never 0).
pub(super) fn new_encoder_id() -> u64 {
    ENCODERS.fetch_add(1, Ordering::Relaxed) + 1
}

impl Encoder {
    /// The codec for the next batch, and whether to probe the other candidates
    /// on its pages (`auto` only).
    fn choose(&self) -> (Codec, Option<Probe>) {
        match self.codec {
            CodecChoice::Fixed(c) => (c, None),
            CodecChoice::Auto => {
                let mut chooser = self.chooser.lock().unwrap();
                if !self.capped {
                    if let Some(bps) = self.socket_bps.lock().unwrap().rate() {
                        chooser.set_link_rate(bps);
                    }
                }
                if let Some((own, user)) = &self.shared {
                    let share = user.bucket().share().min(own.unwrap_or(u64::MAX));
                    chooser.set_link_rate(share as f64);
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
        round: u32,
        runs: &[PageRun],
        codec: Codec,
        probe: Option<Probe>,
        stream: Option<&mut StreamEncoder>,
    ) -> Result<EncodedBatch, MigrationError> {
        let mem = self.guest.memory();
        let zero_hash = zero_page_hash();
        ENCODER.with(|e| {
            let mut enc = e.borrow_mut();
            // Only auto times batches. Costs by CPU time, not wall: with more
            // encoders than cores a batch waits for a core, and wall time
            // would make every codec look slower. The wall time says what
            // share of a core the worker got (`record_share`).
            let t = (self.codec == CodecChoice::Auto)
                .then(|| (crate::cpu::CpuTimer::start(), std::time::Instant::now()));
            let refs = self.sent.is_some();
            let batch = enc.encode_stream(round, codec, runs, refs, stream, |page, buf| {
                // Checked in place first: a zero page (a third of a typical
                // guest) is then never copied. A write racing the check or the
                // copy marks the page dirty, so it is sent again either way.
                if mem.read_page_unless_zero(page, buf) {
                    self.hashes.set(page, zero_hash);
                    return Read::Zero;
                }
                let hash = page_hash(buf);
                let same = self.same_as_held(round, page, hash, buf);
                self.hashes.set(page, hash);
                match (same, &self.sent) {
                    (Some(target), Some((_, key))) => Read::Same {
                        target,
                        hash: ref_tag(key, buf),
                    },
                    _ => Read::Data,
                }
            })?;
            if let Some((t, wall)) = t {
                let secs = t.secs();
                let wall = wall.elapsed().as_secs_f64();
                let guest = u64::from(batch.pages) * PAGE_SIZE as u64;
                // References are not the codec's doing.
                let nonzero = u64::from(batch.pages - batch.zero - batch.refs) * PAGE_SIZE as u64;
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
                            for (&c, _) in crate::codec::CANDIDATES
                                .iter()
                                .zip(set)
                                .filter(|&(&c, wanted)| c != Codec::None && wanted)
                            {
                                out.clear();
                                let _ = crate::codec::compress(c, sample, out);
                            }
                        }
                        // The thread's probe streams hold this migration's
                        // samples only: else a kept stream's timed run finds
                        // a sample the warm-up just gave it, or one an
                        // earlier migration of the same pages gave it, whole
                        // in its window, and looks a hundred times smaller.
                        if PROBE_OWNER.replace(self.id) != self.id {
                            crate::codec::forget_streams();
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
                chooser.record_share(secs, wall);
                for (c, n, secs) in samples {
                    chooser.record_sample(c, sampled, n, secs);
                }
            }
            Ok(batch)
        })
    }

    /// A page the destination holds with the same bytes as `page`'s, read
    /// into `bytes` and hashing to `hash`, sent in round `round`: found by
    /// hash, its recorded hash checked and its bytes now compared in full.
    /// That it was sent with these bytes rests on the reference's keyed
    /// tag, which the destination checks against its own copy.
    fn same_as_held(
        &self,
        round: u32,
        page: PageIndex,
        hash: u64,
        bytes: &[u8],
    ) -> Option<PageIndex> {
        let target = self.sent.as_ref()?.0.find(round, hash)?;
        if target == page || self.hashes.get(target) != hash {
            return None;
        }
        let mut theirs = [0u8; PAGE_SIZE];
        self.guest.memory().read_page(target, &mut theirs);
        (theirs[..] == *bytes).then_some(target)
    }

    /// Batch `job` is applied on the destination and went out once: its
    /// pages with content are held there as their recorded hashes say.
    pub fn record_held(&self, job: &BatchJob) {
        let Some((sent, _)) = &self.sent else { return };
        let zero = zero_page_hash();
        for page in job.runs.iter().flat_map(|r| r.pages()) {
            let hash = self.hashes.get(page);
            if hash != zero {
                sent.insert(job.round, page, hash);
            }
        }
    }

    /// Records how fast a channel's socket took a frame (no cap in the way).
    pub fn record_socket(&self, bytes: usize, elapsed: Duration, channels: u16) {
        let secs = elapsed.as_secs_f64();
        if self.capped || self.codec != CodecChoice::Auto || secs <= 0.0 || bytes < 64 << 10 {
            return;
        }
        self.socket_bps
            .lock()
            .unwrap()
            .record(secs, channels.into(), std::time::Instant::now());
    }

    /// Records that the destination acknowledged a frame of `bytes`.
    pub fn record_ack(&self, bytes: usize) {
        if !self.capped && self.codec == CodecChoice::Auto {
            self.socket_bps.lock().unwrap().record_ack(bytes as f64);
        }
    }

    /// Encodes `work` for the connection whose kept stream is `kept`: raw
    /// batches here (a copy and a hash, about 0.1 ms per MiB: cheaper than
    /// a hop to the blocking pool and back), compressed ones on the
    /// blocking pool, off the runtime's workers.
    pub async fn encode_on_pool(
        self: &Arc<Self>,
        work: &Work,
        kept: &KeptStream,
    ) -> Result<EncodedBatch, MigrationError> {
        let (codec, probe) = match work {
            // A resend is no sample of anything.
            Work::Again(..) => (self.choose().0, None),
            Work::New(_) => self.choose(),
        };
        let runs = &work.job().runs;
        let round = work.job().round;
        if codec == Codec::None && probe.is_none() {
            return self.encode(round, runs, codec, probe, None);
        }
        let (me, runs, kept) = (self.clone(), runs.clone(), kept.clone());
        tokio::task::spawn_blocking(move || {
            let Codec::ZstdStream { level } = codec else {
                return me.encode(round, &runs, codec, probe, None);
            };
            // Taken out while it encodes; an error leaves the slot empty,
            // and the session ends with it.
            let mut stream = match kept.lock().unwrap().take() {
                Some(s) => s,
                None => StreamEncoder::new(level).map_err(MigrationError::from)?,
            };
            let batch = me.encode(round, &runs, codec, probe, Some(&mut stream))?;
            *kept.lock().unwrap() = Some(stream);
            Ok(batch)
        })
        .await
        .map_err(|e| crate::transport::task_failed(crate::migration::Task::Encoder, &e))?
    }

    /// Counts a batch's pages once it is written.
    pub fn count(&self, batch: &EncodedBatch) {
        self.counts.add(
            batch.codec,
            [
                batch.pages.into(),
                batch.zero.into(),
                batch.raw.into(),
                batch.compressed.into(),
                batch.refs.into(),
            ],
        );
    }
}
