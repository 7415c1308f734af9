//! Encoding the source's batches: copy, classify and hash the pages, compress
//! them with the chosen codec, and (with `auto`) measure every candidate so
//! the chooser learns which wins on this link.

use crate::codec::{AutoChooser, Codec, CodecChoice, SocketRate, StreamEncoder, CANDIDATES};
use crate::digest::{page_hash, ref_tag, zero_page_hash, PageHashes};
use crate::memory::PAGE_SIZE;
use crate::migration::report::PageCounter;
use crate::migration::sent::SentIndex;
use crate::migration::similar::{anchors, AnchorIndex};
use crate::migration::source_machine::{BatchJob, Work};
use crate::migration::{MigratableGuest, MigrationError};
use crate::page::PageIndex;
use crate::page::PageRun;
use crate::wire::{patch, BatchEncoder, EncodedBatch, Read};
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
    /// Patches, when the destination takes them too: where content it
    /// holds sits, by anchor.
    pub similar: Option<AnchorIndex>,
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
    /// A page's anchors, while it is encoded.
    static ANCHORS: RefCell<Vec<(u16, u64)>> = const { RefCell::new(Vec::new()) };
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
    /// The codec for the next batch, whether to probe the other candidates
    /// on its pages (`auto` only), and whether to search them for patches
    /// (with a fixed codec, unless it is `none`, which asks for no CPU
    /// beyond a copy; with `auto`, while the CPU has room).
    fn choose(&self) -> (Codec, Option<Probe>, bool) {
        match self.codec {
            CodecChoice::Fixed(c) => (c, None, c != Codec::None),
            CodecChoice::Auto => {
                let mut chooser = self.chooser.lock().unwrap();
                if !self.capped {
                    if let Some(bps) = self.socket_bps.lock().unwrap().rate() {
                        chooser.set_measured_link_rate(bps);
                    }
                }
                if let Some((own, user)) = &self.shared {
                    let share = user.bucket().share().min(own.unwrap_or(u64::MAX));
                    chooser.set_link_rate(share as f64);
                }
                let (codec, probe) = chooser.pick();
                let patch = self.similar.is_some() && chooser.patching();
                tracing::trace!(%codec, probe, patch, link = ?chooser.link_rate(), "auto picked");
                let set = crate::codec::CANDIDATES.map(|c| chooser.probes(c));
                (codec, probe.then_some(set), patch)
            }
        }
    }

    /// Copies, classifies and hashes the pages of a job and encodes the batch
    /// with `codec` (probing the other candidates when `probe`).
    fn encode(
        &self,
        round: u32,
        runs: &[PageRun],
        (codec, probe, patch): (Codec, Option<Probe>, bool),
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
            // The search for patches, timed apart from the codec's work.
            let (mut searched, mut saved) = (Duration::ZERO, 0u64);
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
                    _ if patch => {
                        let t = std::time::Instant::now();
                        let read = self.patch_or_data(round, page, buf);
                        searched += t.elapsed();
                        if let Read::Patch { len, .. } = read {
                            saved += (PAGE_SIZE - len) as u64;
                        }
                        read
                    }
                    _ => Read::Data,
                }
            })?;
            if let Some((t, wall)) = t {
                let (cpu, wall) = (t.secs(), wall.elapsed().as_secs_f64());
                // The search is timed by the wall clock (a thread's CPU clock
                // read per page would cost a third of what it measures):
                // what a worker waiting for a core spent of it is not CPU.
                // It counts at the share of a core the worker got.
                let got = if wall > 0.0 {
                    (cpu / wall).min(1.0)
                } else {
                    1.0
                };
                let search = searched.as_secs_f64() * got;
                let secs = (cpu - search).max(0.0);
                let wall = (wall - searched.as_secs_f64()).max(0.0);
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
                // The codec compressed what the patches left of the pages.
                let input = nonzero.saturating_sub(saved);
                let data = batch.data_bytes as u64;
                chooser.record_patched_batch(codec, guest, [nonzero, input], data, secs);
                chooser.record_share(secs, wall);
                if patch && self.similar.is_some() {
                    chooser.record_patches(nonzero, search, saved);
                }
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

    /// Page `page`, read into `buf`: a patch of a region the destination
    /// holds, if one shares enough of its bytes (the patch then fills the
    /// head of `buf`), else its data. Its anchors enter the index either
    /// way: the destination will hold its bytes once its batch is applied.
    fn patch_or_data(&self, round: u32, page: PageIndex, buf: &mut [u8]) -> Read {
        let Some(similar) = &self.similar else {
            return Read::Data;
        };
        ANCHORS.with(|a| {
            let mut a = a.borrow_mut();
            anchors(buf, &mut a);
            let read = similar
                .base_for(&a)
                .and_then(|base| self.patch_of(round, page, base, buf))
                .unwrap_or(Read::Data);
            similar.insert(page.0 * PAGE_SIZE as u64, &a);
            read
        })
    }

    /// `buf` (page `page`'s bytes) as a patch of the page-sized region
    /// from byte `base`, if every page the region touches is held by the
    /// destination from this round with the bytes guest memory has now
    /// (read once: the patch and its tag are made of those bytes), and
    /// the patch is worth sending.
    fn patch_of(&self, round: u32, page: PageIndex, base: u64, buf: &mut [u8]) -> Option<Read> {
        let (sent, key) = self.sent.as_ref()?;
        let first = PageIndex(base / PAGE_SIZE as u64);
        let at = (base % PAGE_SIZE as u64) as usize;
        let touched = 1 + usize::from(at > 0);
        if first.0 + touched as u64 > self.guest.memory().pages() {
            return None;
        }
        let mut two = [0u8; 2 * PAGE_SIZE];
        for k in 0..touched {
            let p = PageIndex(first.0 + k as u64);
            let hash = self.hashes.get(p);
            if p == page || sent.find(round, hash) != Some(p) {
                return None;
            }
            let bytes = &mut two[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
            self.guest.memory().read_page(p, bytes);
            if page_hash(bytes) != hash {
                return None;
            }
        }
        let region = &two[at..at + PAGE_SIZE];
        let mut ops = [0u8; PAGE_SIZE];
        let len = patch::diff(buf, region, &mut ops)?;
        buf[..len].copy_from_slice(&ops[..len]);
        Some(Read::Patch {
            base,
            tag: ref_tag(key, region),
            len,
        })
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
        let (codec, probe, patch) = match work {
            // A resend is no sample of anything.
            Work::Again(..) => {
                let (codec, _, patch) = self.choose();
                (codec, None, patch)
            }
            Work::New(_) => self.choose(),
        };
        let runs = &work.job().runs;
        let round = work.job().round;
        // A search for patches is no cheap step either.
        if codec == Codec::None && probe.is_none() && !(patch && self.similar.is_some()) {
            return self.encode(round, runs, (codec, probe, patch), None);
        }
        let (me, runs, kept) = (self.clone(), runs.clone(), kept.clone());
        tokio::task::spawn_blocking(move || {
            let Codec::ZstdStream { level } = codec else {
                return me.encode(round, &runs, (codec, probe, patch), None);
            };
            // Taken out while it encodes; an error leaves the slot empty,
            // and the session ends with it.
            let mut stream = match kept.lock().unwrap().take() {
                Some(s) => s,
                // Patches find most of what long-distance matching would.
                None => {
                    StreamEncoder::new(level, me.similar.is_none()).map_err(MigrationError::from)?
                }
            };
            let batch = me.encode(round, &runs, (codec, probe, patch), Some(&mut stream))?;
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
                batch.patches.into(),
            ],
        );
    }
}
