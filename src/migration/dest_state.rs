//! The destination's protocol state machine, free of sockets and clocks.
//!
//! ```text
//! AwaitNegotiate ─Negotiate─▶ AwaitSetup ─SessionSetup─▶ Receiving{round 0}
//! Receiving{r} ─RoundEnd(r)─▶ Receiving{r+1}      (final_next: the guest is paused
//!                                                  on the source, r+1 is the last)
//! Receiving{r, final} ─Switchover(digest ok)─▶ AwaitGo ─Go─▶ Running
//! any ─Abort, bad message, digest mismatch─▶ Aborted
//! ```
//!
//! Batches of later rounds may overtake the `RoundEnd(r)` that travels on a
//! control channel (that channel's reader may be busy applying a large batch
//! while the others carry on: a soak under load saw round `r + 2` arrive
//! before `RoundEnd(r)` was read), so a round-`r` state accepts every round
//! from `r` on, and none past the final round once it is known. The source
//! only starts round `r + 1` after every batch of round `r` was
//! acknowledged, so no page of a later round can be overwritten by a stale
//! one; earlier rounds are refused.

use super::{MigrationError, Mismatch, Shortfall, Violation};
use crate::codec::CodecId;
use crate::memory::{MAX_MEMORY_BYTES, PAGE_SIZE};
use crate::wire::{
    Command, GuestKind, Limits, Negotiate, NegotiateResponse, Ready, RoundEnd, SessionSetup,
    Switchover, CAPABILITIES, VERSION,
};

/// Where the destination is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestState {
    /// Waiting for the first frame.
    AwaitNegotiate,
    /// Negotiated; waiting for the session setup.
    AwaitSetup,
    /// Applying pages of a round.
    Receiving {
        /// The round in progress.
        round: u32,
        /// Whether this is the final round (guest paused on the source).
        final_round: bool,
    },
    /// READY sent; waiting for GO.
    AwaitGo,
    /// GO received: the guest is ours.
    Running,
    /// The session failed; the copy is discarded.
    Aborted,
}

/// The destination's protocol logic.
#[derive(Debug, Clone)]
pub struct DestMachine {
    state: DestState,
    max_memory: u64,
    hosts_kvm: bool,
    setup: Option<SessionSetup>,
    /// The codecs it decodes, then those agreed ([`CodecId::bit`]s).
    codecs: u32,
}

impl DestMachine {
    /// A machine that accepts guests of up to `max_memory` bytes.
    pub fn new(max_memory: u64) -> Self {
        Self {
            state: DestState::AwaitNegotiate,
            max_memory: max_memory.min(MAX_MEMORY_BYTES),
            hosts_kvm: false,
            setup: None,
            codecs: CodecId::None.bit()
                | CodecId::Lz4.bit()
                | CodecId::Zstd.bit()
                | CodecId::ZstdStream.bit(),
        }
    }

    /// Whether it decodes kept zstd streams (default: yes). Without, a
    /// source asking for them is told no at NEGOTIATE.
    pub fn kept_streams(mut self, yes: bool) -> Self {
        if !yes {
            self.codecs &= !CodecId::ZstdStream.bit();
        }
        self
    }

    /// The codecs agreed at NEGOTIATE ([`CodecId::bit`]s): a batch in any
    /// other is a protocol violation.
    pub fn codecs(&self) -> u32 {
        self.codecs
    }

    /// Whether this host can run KVM guests (a working `/dev/kvm`); without
    /// it, KVM guests are refused at SESSION_SETUP, before any memory is
    /// allocated. Default: no, synthetic guests only.
    pub fn hosting_kvm(mut self, yes: bool) -> Self {
        self.hosts_kvm = yes;
        self
    }

    /// The current state.
    pub fn state(&self) -> DestState {
        self.state
    }

    /// The accepted session setup.
    pub fn setup(&self) -> Option<&SessionSetup> {
        self.setup.as_ref()
    }

    fn expect(&self, want: DestState, got: Command) -> Result<(), MigrationError> {
        if self.state != want {
            return Err(self.out_of_turn(got, None));
        }
        Ok(())
    }

    fn out_of_turn(&self, got: Command, round: Option<u32>) -> MigrationError {
        Violation::OutOfTurn {
            got,
            round,
            state: self.state,
        }
        .into()
    }

    fn fail<T>(&mut self, e: MigrationError) -> Result<T, MigrationError> {
        self.state = DestState::Aborted;
        Err(e)
    }

    /// Handles NEGOTIATE: picks the version, checks codecs and page size.
    pub fn handle_negotiate(&mut self, m: &Negotiate) -> Result<NegotiateResponse, MigrationError> {
        self.expect(DestState::AwaitNegotiate, Command::Negotiate)?;
        if !(m.min_version..=m.max_version).contains(&VERSION) {
            return self.fail(
                Mismatch::Version {
                    min: m.min_version,
                    max: m.max_version,
                    ours: VERSION,
                }
                .into(),
            );
        }
        if m.page_size != PAGE_SIZE as u32 {
            return self.fail(
                Mismatch::PageSize {
                    theirs: m.page_size,
                    ours: PAGE_SIZE as u32,
                }
                .into(),
            );
        }
        self.codecs &= m.codecs | CodecId::None.bit();
        self.state = DestState::AwaitSetup;
        Ok(NegotiateResponse {
            version: VERSION,
            capabilities: CAPABILITIES & m.capabilities,
            codecs: self.codecs & m.codecs,
            page_size: PAGE_SIZE as u32,
            // The driver draws the challenge.
            nonce: [0; 16],
        })
    }

    /// Handles SESSION_SETUP: checks the guest fits. Returns the page limits for
    /// every later batch.
    pub fn handle_setup(&mut self, m: &SessionSetup) -> Result<Limits, MigrationError> {
        self.expect(DestState::AwaitSetup, Command::SessionSetup)?;
        if m.memory_bytes == 0 || !m.memory_bytes.is_multiple_of(PAGE_SIZE as u64) {
            return self.fail(
                Violation::MemorySize {
                    bytes: m.memory_bytes,
                }
                .into(),
            );
        }
        if m.memory_bytes > self.max_memory {
            return self.fail(
                Shortfall::GuestSize {
                    bytes: m.memory_bytes,
                    limit: self.max_memory,
                }
                .into(),
            );
        }
        if m.guest_kind == GuestKind::Kvm && !self.hosts_kvm {
            return self.fail(Mismatch::NoKvm.into());
        }
        self.setup = Some(m.clone());
        self.state = DestState::Receiving {
            round: 0,
            final_round: false,
        };
        Ok(Limits {
            guest_pages: m.memory_bytes / PAGE_SIZE as u64,
        })
    }

    /// Checks that a batch of `round` may be applied now.
    pub fn check_batch(&self, round: u32) -> Result<(), MigrationError> {
        match self.state {
            DestState::Receiving {
                round: r,
                final_round,
            } if round == r || (!final_round && round > r) => Ok(()),
            _ => Err(self.out_of_turn(Command::PageBatch, Some(round))),
        }
    }

    /// Checks a page batch's codec is one NEGOTIATE agreed on.
    pub fn check_codec(&self, codec: CodecId) -> Result<(), MigrationError> {
        if self.codecs & codec.bit() == 0 {
            return Err(Violation::CodecNotAgreed { codec }.into());
        }
        Ok(())
    }

    /// Handles ROUND_END.
    pub fn handle_round_end(&mut self, m: &RoundEnd) -> Result<(), MigrationError> {
        match self.state {
            DestState::Receiving {
                round,
                final_round: false,
            } if round == m.round => {
                let Some(next) = round.checked_add(1) else {
                    return self.fail(Violation::RoundOverflow.into());
                };
                self.state = DestState::Receiving {
                    round: next,
                    final_round: m.final_next,
                };
                Ok(())
            }
            _ => {
                let e = self.out_of_turn(Command::RoundEnd, Some(m.round));
                self.fail(e)
            }
        }
    }

    /// Checks that SWITCHOVER comes in turn (the final round on, and it
    /// names it), before its digest is computed.
    pub fn check_switchover(&mut self, m: &Switchover) -> Result<(), MigrationError> {
        match self.state {
            DestState::Receiving {
                round,
                final_round: true,
            } if round == m.final_round => Ok(()),
            _ => {
                let e = self.out_of_turn(Command::Switchover, Some(m.final_round));
                self.fail(e)
            }
        }
    }

    /// Handles SWITCHOVER once every page is applied: compares the digests.
    pub fn handle_switchover(
        &mut self,
        m: &Switchover,
        local_digest: u64,
    ) -> Result<Ready, MigrationError> {
        self.check_switchover(m)?;
        if m.digest != local_digest {
            return self.fail(MigrationError::DigestMismatch {
                source_digest: m.digest,
                destination_digest: local_digest,
            });
        }
        self.state = DestState::AwaitGo;
        Ok(Ready {
            digest: local_digest,
        })
    }

    /// Handles GO: the guest is ours from now on.
    pub fn handle_go(&mut self) -> Result<(), MigrationError> {
        if self.state != DestState::AwaitGo {
            let e = self.out_of_turn(Command::Go, None);
            return self.fail(e);
        }
        self.state = DestState::Running;
        Ok(())
    }

    /// Marks the session aborted (peer abort, broken channel). A session that is
    /// already `Running` stays so: after GO the guest is ours whatever happens.
    pub fn abort(&mut self) {
        if self.state != DestState::Running {
            self.state = DestState::Aborted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::VerifyMode;
    use bytes::Bytes;

    fn negotiate() -> Negotiate {
        Negotiate {
            min_version: VERSION,
            max_version: VERSION,
            capabilities: 0,
            codecs: 7,
            page_size: 4096,
            nonce: [0; 16],
        }
    }

    fn setup(bytes: u64) -> SessionSetup {
        SessionSetup::plain(bytes, 2)
    }

    fn switchover(final_round: u32, digest: u64) -> Switchover {
        Switchover {
            final_round,
            digest,
            verify: VerifyMode::Fast,
            rounds: final_round,
            dirty_rate_bps: 0,
            throttle_pct_max: 0,
            source_cpu_ms: 0,
            state: Bytes::new(),
        }
    }

    fn end(round: u32, final_next: bool) -> RoundEnd {
        RoundEnd {
            round,
            pages: 1,
            final_next,
        }
    }

    #[test]
    fn happy_path() {
        let mut m = DestMachine::new(1 << 30);
        m.handle_negotiate(&negotiate()).unwrap();
        let limits = m.handle_setup(&setup(1 << 20)).unwrap();
        assert_eq!(limits.guest_pages, 256);
        m.check_batch(0).unwrap();
        m.check_batch(1).unwrap(); // may overtake ROUND_END(0)
        m.check_batch(2).unwrap(); // and ROUND_END(1), on a busy channel
        m.handle_round_end(&end(0, false)).unwrap();
        assert!(m.check_batch(0).is_err(), "no stale round");
        m.handle_round_end(&end(1, true)).unwrap();
        m.check_batch(2).unwrap();
        assert!(m.check_batch(3).is_err(), "nothing after the final round");
        m.handle_switchover(&switchover(2, 42), 42).unwrap();
        assert!(m.check_batch(2).is_err(), "no batch after switchover");
        m.handle_go().unwrap();
        m.abort();
        assert_eq!(m.state(), DestState::Running, "after GO the guest stays");
    }

    #[test]
    fn the_codecs_agreed_are_those_both_sides_name() {
        let stream = CodecId::ZstdStream.bit();
        let asked = CodecId::Lz4.bit() | stream;
        let mut m = DestMachine::new(1 << 30);
        let r = m
            .handle_negotiate(&Negotiate {
                codecs: asked,
                ..negotiate()
            })
            .unwrap();
        assert_eq!(r.codecs, asked);
        assert_eq!(m.codecs(), asked | CodecId::None.bit());
        // A batch in a codec not agreed on is a violation.
        m.check_codec(CodecId::Lz4).unwrap();
        m.check_codec(CodecId::None).unwrap();
        let e = m.check_codec(CodecId::Zstd).unwrap_err();
        assert!(e.to_string().contains("did not agree"), "{e}");
        // A receiver without kept streams declines them.
        let mut m = DestMachine::new(1 << 30).kept_streams(false);
        let r = m
            .handle_negotiate(&Negotiate {
                codecs: asked,
                ..negotiate()
            })
            .unwrap();
        assert_eq!(r.codecs, CodecId::Lz4.bit());
        assert_eq!(m.codecs() & stream, 0);
    }

    #[test]
    fn out_of_order_messages_abort() {
        let mut m = DestMachine::new(1 << 30);
        assert!(m.handle_setup(&setup(4096)).is_err());
        let mut m = DestMachine::new(1 << 30);
        m.handle_negotiate(&negotiate()).unwrap();
        assert!(m.handle_negotiate(&negotiate()).is_err());
        m.handle_setup(&setup(4096)).unwrap();
        assert!(m.handle_go().is_err());
        assert_eq!(m.state(), DestState::Aborted);

        let mut m = DestMachine::new(1 << 30);
        m.handle_negotiate(&negotiate()).unwrap();
        m.handle_setup(&setup(4096)).unwrap();
        assert!(
            m.handle_switchover(&switchover(0, 1), 1).is_err(),
            "switchover before the final round"
        );
        let mut m = DestMachine::new(1 << 30);
        m.handle_negotiate(&negotiate()).unwrap();
        m.handle_setup(&setup(4096)).unwrap();
        assert!(m.handle_round_end(&end(3, false)).is_err(), "wrong round");
    }

    #[test]
    fn limits_and_incompatibilities() {
        let mut m = DestMachine::new(1 << 20);
        assert!(m
            .handle_negotiate(&Negotiate {
                page_size: 65536,
                ..negotiate()
            })
            .is_err());
        let mut m = DestMachine::new(1 << 20);
        assert!(m
            .handle_negotiate(&Negotiate {
                min_version: VERSION + 1,
                max_version: VERSION + 2,
                ..negotiate()
            })
            .is_err());
        let mut m = DestMachine::new(1 << 20);
        m.handle_negotiate(&negotiate()).unwrap();
        assert!(matches!(
            m.handle_setup(&setup(2 << 20)),
            Err(MigrationError::Resources(_))
        ));
        let mut m = DestMachine::new(1 << 20);
        m.handle_negotiate(&negotiate()).unwrap();
        assert!(m.handle_setup(&setup(1000)).is_err());
        // KVM guests only where the host runs them.
        let kvm = SessionSetup {
            guest_kind: GuestKind::Kvm,
            ..setup(4096)
        };
        let mut m = DestMachine::new(1 << 20);
        m.handle_negotiate(&negotiate()).unwrap();
        let e = m.handle_setup(&kvm).unwrap_err().to_string();
        assert!(e.contains("/dev/kvm"), "{e}");
        let mut m = DestMachine::new(1 << 20).hosting_kvm(true);
        m.handle_negotiate(&negotiate()).unwrap();
        m.handle_setup(&kvm).unwrap();
    }

    #[test]
    fn digest_mismatch_aborts() {
        let mut m = DestMachine::new(1 << 30);
        m.handle_negotiate(&negotiate()).unwrap();
        m.handle_setup(&setup(4096)).unwrap();
        m.handle_round_end(&end(0, true)).unwrap();
        let e = m.handle_switchover(&switchover(1, 1), 2).unwrap_err();
        assert!(matches!(e, MigrationError::DigestMismatch { .. }));
        assert_eq!(m.state(), DestState::Aborted);
        assert!(m.handle_go().is_err(), "never GO after a mismatch");
    }
}
