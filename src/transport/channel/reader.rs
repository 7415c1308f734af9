//! A channel's read half: whole, CRC-checked (and, once keyed, tagged)
//! frames, a page batch's pages read straight into guest memory.

use super::*;

/// Reads whole, CRC-checked frames from a channel.
#[derive(Debug)]
pub struct FrameReader {
    rd: BufReader<ReadSide>,
    channel: ChannelId,
    bytes: Arc<AtomicU64>,
    buf: BytesMut,
    /// Payloads above this are refused from the header alone.
    max_payload: u32,
    /// Once the session is keyed without TLS: each frame's tag is checked
    /// instead of its CRC.
    mac: Option<Box<FrameMac>>,
    /// Copies of placed pages for their check (a block, once one was placed).
    scratch: Vec<u8>,
}

impl FrameReader {
    /// Wraps a plain read half; counts bytes read into `bytes`.
    pub fn new(rd: OwnedReadHalf, channel: ChannelId, bytes: Arc<AtomicU64>) -> Self {
        Self::with(ReadSide::Plain(rd), channel, bytes)
    }

    /// A reader for a connection whose peer has not proved anything yet:
    /// payloads of at most [`HANDSHAKE_MAX_PAYLOAD`] and a small buffer,
    /// until [`FrameReader::open_up`].
    pub(super) fn with(rd: ReadSide, channel: ChannelId, bytes: Arc<AtomicU64>) -> Self {
        Self {
            rd: BufReader::with_capacity(HANDSHAKE_BUFFER, rd),
            channel,
            bytes,
            buf: BytesMut::new(),
            max_payload: HANDSHAKE_MAX_PAYLOAD,
            mac: None,
            scratch: Vec::new(),
        }
    }

    /// From the next frame on, every frame must carry a tag under `key`
    /// (this connection's, peer to here); its CRC is no longer checked.
    pub fn authenticate(&mut self, key: [u8; 32]) {
        self.mac = Some(Box::new(FrameMac::new(key)));
    }

    /// The peer proved the key: take frames up to [`MAX_FRAME_LEN`] and read
    /// through a larger buffer.
    ///
    /// [`MAX_FRAME_LEN`]: crate::wire::MAX_FRAME_LEN
    #[must_use]
    pub fn open_up(mut self) -> Self {
        if self.max_payload < crate::wire::MAX_FRAME_LEN && self.rd.buffer().is_empty() {
            // Nothing buffered is lost by swapping the buffer.
            self.rd = BufReader::with_capacity(SESSION_BUFFER, self.rd.into_inner());
        }
        self.max_payload = crate::wire::MAX_FRAME_LEN;
        self
    }

    /// The largest payload this reader takes now.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// The channel number.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// Sets the channel number (once bound).
    pub fn set_channel(&mut self, channel: ChannelId) {
        self.channel = channel;
    }

    /// Counts into `bytes` from now on, carrying over what was counted so far
    /// (a bound channel joins its session's counter).
    pub fn share_counter(&mut self, bytes: Arc<AtomicU64>) {
        bytes.fetch_add(self.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        self.bytes = bytes;
    }

    /// The next frame; `None` on a clean close between frames. A close inside a
    /// frame, a bad header or a bad CRC is an error. The payload is allocated
    /// only after the header's length has been checked.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, MigrationError> {
        let Some((raw, header, crc)) = self.read_header().await? else {
            return Ok(None);
        };
        self.buf.clear();
        self.read_payload(raw, header, crc).await.map(Some)
    }

    /// The next frame, reading a raw page batch's pages straight from the
    /// socket into `memory` (no staging copy), after its metadata has been
    /// decoded against `limits` and `accept`ed (the receiver's state check, so
    /// no page is written unless a batch is welcome; `Ok(false)` reads the
    /// batch whole instead, unplaced). The CRC is then checked over the
    /// pages in place, each page copied once for it and for `on_page` (the
    /// receiver's hash, valid only if the CRC holds). A bad CRC ends the
    /// session (the pages written are the destination's discarded copy); a
    /// connection lost inside the pages is a channel loss, after which the
    /// source sends the same batch again over the same pages. Only plain,
    /// untagged channels place: with tags (or TLS) batches are read whole
    /// and checked before any page is written. Other frames come back whole,
    /// as from [`FrameReader::read_frame`].
    pub async fn read_placing(
        &mut self,
        memory: &GuestMemory,
        limits: Limits,
        accept: impl FnOnce(&Header, &PageBatch) -> Result<bool, MigrationError>,
        mut on_page: impl FnMut(u64, &[u8]),
    ) -> Result<Option<Received>, MigrationError> {
        let Some((raw, header, crc)) = self.read_header().await? else {
            return Ok(None);
        };
        self.buf.clear();
        let len = header.payload_len as usize;
        if header.command != Command::PageBatch || len < PageBatch::FIXED_LEN {
            return self
                .read_payload(raw, header, crc)
                .await
                .map(|f| Some(Received::Frame(f)));
        }
        self.fill_to(PageBatch::FIXED_LEN, header.command).await?;
        let fixed = &self.buf[..PageBatch::FIXED_LEN];
        // Over TLS the pages are decrypted first, and with tags nothing may
        // reach guest memory before the whole frame's tag holds (placed pages
        // are written before the check, and a connection cut inside them is
        // a channel loss the session survives): read those whole.
        // A batch with references is read whole too: they follow its data.
        let placeable = matches!(self.rd.get_ref(), ReadSide::Plain(_))
            && self.mac.is_none()
            && !PageBatch::has_refs(fixed);
        let prefix = match (PageBatch::codec_of(fixed), PageBatch::prefix_len(fixed)) {
            (Some(CodecId::None), Ok(prefix)) if prefix < len && placeable => prefix,
            // Compressed, all-zero or malformed: read it whole; decoding names
            // what is wrong.
            _ => {
                return self
                    .read_payload(raw, header, crc)
                    .await
                    .map(|f| Some(Received::Frame(f)))
            }
        };
        self.fill_to(prefix, header.command).await?;
        let meta = bytes::Bytes::copy_from_slice(&self.buf[..prefix]);
        let batch = PageBatch::decode_split(meta.clone(), len - prefix, limits)?;
        if !accept(&header, &batch)? {
            // Not to be placed (a resend of a batch already here): read it
            // whole, prefix included.
            return self
                .read_payload(raw, header, crc)
                .await
                .map(|f| Some(Received::Frame(f)));
        }
        let _ = self.buf.split_to(prefix);
        let regions = batch.data_regions();
        let mut fill = PageFill::new(memory, &regions).expect("decode checked the runs");
        let buffered = fill.copy_from(self.rd.buffer());
        std::pin::Pin::new(&mut self.rd).consume(buffered);
        let ReadSide::Plain(rd) = self.rd.get_ref() else {
            unreachable!("placing reads plain channels only")
        };
        let stream: &TcpStream = rd.as_ref();
        while fill.remaining() > 0 {
            let read = || fill.read_from(stream.as_fd());
            let n = match stream.try_io(Interest::READABLE, read) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    stream.readable().await.map_err(|e| self.read_error(e))?;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(e)),
            };
            if n == 0 {
                return Err(self.closed_inside(header.command));
            }
        }
        let mut check = Check::start(&mut self.mac, &raw);
        check.update(&meta);
        fill.for_each_block(&mut self.scratch, |indices, bytes| {
            check.update(bytes);
            for (&index, page) in indices.iter().zip(bytes.chunks_exact(PAGE_SIZE)) {
                on_page(index.0, page);
            }
        });
        let tag = self.read_tag(header.command).await?;
        check.check(crc, tag.as_ref())?;
        let total = HEADER_LEN + len + tag.map_or(0, |t| t.len());
        self.bytes.fetch_add(total as u64, Ordering::Relaxed);
        Ok(Some(Received::Placed(header, batch)))
    }

    fn read_error(&self, e: std::io::Error) -> MigrationError {
        MigrationError::io(format!("read from channel {}", self.channel), e)
    }

    fn closed_inside(&self, command: Command) -> MigrationError {
        MigrationError::ChannelLost {
            channel: self.channel,
            why: ChannelLoss::ClosedInPayload(command),
        }
    }

    /// Reads and checks a frame header; `None` on a clean close before it.
    async fn read_header(
        &mut self,
    ) -> Result<Option<([u8; HEADER_LEN], Header, u32)>, MigrationError> {
        let mut raw = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let n = self
                .rd
                .read(&mut raw[got..])
                .await
                .map_err(|e| self.read_error(e))?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(MigrationError::ChannelLost {
                    channel: self.channel,
                    why: ChannelLoss::ClosedInHeader,
                });
            }
            got += n;
            crate::wire::check_magic(&raw[..got])?;
        }
        let (header, crc) = Header::parse(&raw)?;
        if header.payload_len > self.max_payload {
            return Err(crate::wire::DecodeError::FrameTooLong {
                len: header.payload_len,
                max: self.max_payload,
            }
            .into());
        }
        Ok(Some((raw, header, crc)))
    }

    /// Reads into `buf` until it holds `want` bytes (a checked length).
    async fn fill_to(&mut self, want: usize, command: Command) -> Result<(), MigrationError> {
        // Read into a buffer that is reclaimed once earlier payloads are
        // dropped, without zeroing it first; only the checked length is reserved.
        self.buf.reserve(want.saturating_sub(self.buf.len()));
        while self.buf.len() < want {
            let more = (want - self.buf.len()) as u64;
            let n = (&mut self.rd)
                .take(more)
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| self.read_error(e))?;
            if n == 0 {
                return Err(self.closed_inside(command));
            }
        }
        Ok(())
    }

    /// Reads the rest of a frame's payload into `buf` (which may hold its
    /// start) and checks the CRC.
    async fn read_payload(
        &mut self,
        raw: [u8; HEADER_LEN],
        header: Header,
        crc: u32,
    ) -> Result<Frame, MigrationError> {
        let len = header.payload_len as usize;
        let tagged = if self.mac.is_some() { MAC_LEN } else { 0 };
        self.fill_to(len + tagged, header.command).await?;
        let payload = self.buf.split_to(len);
        let tag = self.buf.split_to(tagged);
        let mut check = Check::start(&mut self.mac, &raw);
        check.update(&payload);
        check.check(crc, tag.as_ref().try_into().ok())?;
        self.bytes
            .fetch_add((HEADER_LEN + len + tagged) as u64, Ordering::Relaxed);
        Ok(Frame {
            header,
            payload: payload.freeze(),
        })
    }
}

impl FrameReader {
    /// Reads the tag after a placed batch's pages, when frames carry one.
    async fn read_tag(
        &mut self,
        command: Command,
    ) -> Result<Option<[u8; MAC_LEN]>, MigrationError> {
        if self.mac.is_none() {
            return Ok(None);
        }
        self.buf.clear();
        self.fill_to(MAC_LEN, command).await?;
        let tag = self.buf.split_to(MAC_LEN);
        Ok(Some(tag.as_ref().try_into().expect("MAC_LEN bytes")))
    }
}

/// A frame's check as its payload is read: its tag when the connection is
/// authenticated, else its CRC. A local of one read, never moved around: the
/// hasher's size does not matter.
#[allow(clippy::large_enum_variant)]
enum Check {
    Crc(FrameCrc),
    Mac(crate::wire::FrameTag),
}

impl Check {
    fn start(mac: &mut Option<Box<FrameMac>>, raw: &[u8; HEADER_LEN]) -> Self {
        match mac {
            Some(m) => Check::Mac(m.begin(raw)),
            None => Check::Crc(FrameCrc::new(raw)),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Check::Crc(c) => c.update(bytes),
            Check::Mac(t) => t.update(bytes),
        }
    }

    /// Checks the CRC field, or the tag read after the payload.
    fn check(self, crc: u32, tag: Option<&[u8; MAC_LEN]>) -> Result<(), crate::wire::DecodeError> {
        match (self, tag) {
            (Check::Crc(c), _) => c.check(crc),
            (Check::Mac(t), Some(tag)) => t.check(tag),
            (Check::Mac(_), None) => Err(crate::wire::DecodeError::Mac),
        }
    }
}
