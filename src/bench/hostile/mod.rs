//! `ferry bench hostile`: the hostile suite against a live receiver or agent.
//! Each case sends what an attacker or a broken peer would (garbage, a frame
//! announcing more than a handshake needs, an unproved labelled session, a
//! bind to no session, a setup field out of range, a flood of silent
//! connections; against an agent's API also no token, values out of range,
//! slow clients) and says what came back against what ferry promises. A real
//! migration through the same listener ends the suite, while the flood is
//! still held open: it must complete.

mod api;

use crate::agent::client::name_of;
use crate::agent::request::{Amount, CreateMigration, CreateVm, MigrationParams};
use crate::agent::VmState;
use crate::migration::auth::SessionKey;
use crate::migration::{MigrationConfig, Outcome};
use crate::transport::{migrate, RunContext};
use crate::wire::{
    encode_frame, ChannelBind, Command, FrameDecoder, GuestKind, Header, Limits, Message,
    Negotiate, SessionLabel, SessionSetup,
};
pub use api::run_api;
use bytes::BytesMut;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the suite is run against.
#[derive(Debug, Clone)]
pub struct Target {
    /// The migration listener, host:port.
    pub data: String,
    /// The key a real source proves there (`None`: a keyless receiver).
    pub key: Option<SessionKey>,
    /// Whether the listener takes TLS only (agents do by default).
    pub tls: bool,
    /// Silent connections held open while the real migration runs.
    pub flood: usize,
    /// The label a real migration carries (agents take labelled sessions
    /// from their cluster only: then the real migration goes through the
    /// agents' API instead, and this is `None`).
    pub real: RealMigration,
}

/// How the suite's closing migration is made.
#[derive(Debug, Clone)]
pub enum RealMigration {
    /// `migrate()` of a small guest straight to the listener.
    Direct,
    /// Through the cluster's agents: a VM made on `from` moved to `to`.
    Agents {
        /// The cluster.
        cluster: Box<crate::agent::Cluster>,
        /// A node the VM starts on.
        from: String,
        /// The target node (whose listener this is).
        to: String,
    },
}

/// One case of the suite.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    /// Its name.
    pub case: &'static str,
    /// What was sent.
    pub input: String,
    /// What ferry promises.
    pub expected: String,
    /// What came back.
    pub outcome: String,
    /// Whether the outcome keeps the promise.
    pub ok: bool,
}

type Stream = Box<dyn Io>;
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection to the listener, over TLS when it takes TLS only.
async fn connect(t: &Target) -> Result<Stream, String> {
    let tcp = TcpStream::connect(&t.data)
        .await
        .map_err(|e| format!("connect {}: {e}", t.data))?;
    if !t.tls {
        return Ok(Box::new(tcp));
    }
    let (s, _) = crate::transport::tls::TlsClient::bound_to_key()
        .connect(tcp)
        .await?;
    Ok(Box::new(s))
}

/// What the listener did next: a message, a close, or nothing in time.
async fn answer(s: &mut Stream, within: Duration) -> String {
    let mut buf = BytesMut::new();
    let mut dec = FrameDecoder::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    return match Message::decode(&f.header, f.payload, Limits::BEFORE_SETUP) {
                        Ok(Message::Abort(a)) => {
                            format!("ABORT: {}", crate::wire::escape_text(&a.message))
                        }
                        Ok(m) => format!("{:?}", m.command()),
                        Err(e) => format!("an undecodable answer: {e}"),
                    }
                }
                Ok(None) => {}
                Err(e) => return format!("an undecodable answer: {e}"),
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return "closed".to_string(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .unwrap_or_else(|_| format!("nothing within {within:?}"))
}

fn frame(header: Header, msg: &Message) -> Vec<u8> {
    let header = Header {
        command: msg.command(),
        ..header
    };
    encode_frame(&header, &msg.encode_payload())
}

fn negotiate() -> Message {
    Message::Negotiate(Negotiate {
        min_version: crate::wire::VERSION,
        max_version: crate::wire::VERSION,
        capabilities: 0,
        codecs: 7,
        page_size: crate::memory::PAGE_SIZE as u32,
        nonce: [7; 16],
    })
}

fn setup(channels: u16, label: Option<SessionLabel>, proof: Option<[u8; 32]>) -> Message {
    Message::SessionSetup(SessionSetup {
        label,
        proof,
        ..SessionSetup::plain(1 << 20, channels)
    })
}

/// Sends `bytes` on a new connection (after `prelude` messages answered)
/// and reads the answer.
async fn probe(t: &Target, prelude: &[Vec<u8>], bytes: &[u8]) -> String {
    let mut s = match connect(t).await {
        Ok(s) => s,
        Err(e) => return format!("not connected ({e})"),
    };
    for p in prelude {
        if s.write_all(p).await.is_err() {
            return "closed".into();
        }
        let got = answer(&mut s, Duration::from_secs(5)).await;
        if got.starts_with("ABORT") || got == "closed" || got.starts_with("nothing") {
            return format!("{got} (before the case's frame)");
        }
    }
    if s.write_all(bytes).await.is_err() {
        return "closed".into();
    }
    answer(&mut s, Duration::from_secs(12)).await
}

/// The name of the suite's VM (its closing migration, and the label its
/// unproved sessions carry).
fn probe_vm() -> String {
    format!("hostile-probe-{}", std::process::id())
}

/// A NEGOTIATE answered, then a setup labelled `vm` with a wrong proof.
fn unproved_setup(vm: &str) -> Vec<u8> {
    let label = SessionLabel {
        vm: vm.into(),
        migration_id: "hostile-1".into(),
        source_node: "nobody".into(),
    };
    frame(
        Header::new(Command::SessionSetup),
        &setup(1, Some(label), Some([0; 32])),
    )
}

fn case(case: &'static str, input: &str, expected: &str, outcome: String, ok: bool) -> Case {
    Case {
        case,
        input: input.into(),
        expected: expected.into(),
        outcome,
        ok,
    }
}

/// Refused: an ABORT saying `why`, or (where the listener cannot frame an
/// answer, as under TLS for non-TLS bytes) a close.
fn refused(outcome: &str, why: &str) -> bool {
    (outcome.starts_with("ABORT") && outcome.contains(why)) || outcome == "closed"
}

/// Runs the listener's cases, then the real migration with the flood held.
pub async fn run(t: &Target) -> Vec<Case> {
    let mut out = Vec::new();
    let got = probe(t, &[], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let ok = refused(&got, "magic");
    out.push(case(
        "garbage",
        "an HTTP request where a frame should start",
        "refused, closed",
        got,
        ok,
    ));

    let mut f = frame(Header::new(Command::Negotiate), &negotiate());
    f[32..36].copy_from_slice(&(1u32 << 20).to_le_bytes());
    let got = probe(t, &[], &f[..40]).await;
    let ok = refused(&got, "exceeds the 8192 byte limit");
    out.push(case(
        "oversized_first_frame",
        "a first header announcing 1 MiB",
        "refused from the header alone",
        got,
        ok,
    ));

    let bind = Message::ChannelBind(ChannelBind {
        nonce: [1; 16],
        proof: [2; 32],
    });
    let got = probe(
        t,
        &[],
        &frame(
            Header {
                session_id: 0x1234_5678,
                channel: crate::wire::ChannelId(1),
                ..Header::new(Command::ChannelBind)
            },
            &bind,
        ),
    )
    .await;
    let ok = refused(&got, "unknown session");
    out.push(case(
        "bind_to_no_session",
        "a CHANNEL_BIND to a session that does not exist",
        "refused",
        got,
        ok,
    ));

    let vm = probe_vm();
    let nego = frame(Header::new(Command::Negotiate), &negotiate());
    let unproved = unproved_setup(&vm);
    let got = probe(t, std::slice::from_ref(&nego), &unproved).await;
    let ok = if t.key.is_some() {
        refused(&got, "proof of the key is wrong")
    } else {
        true
    };
    let expected = if t.key.is_some() {
        "refused, nothing kept"
    } else {
        "n/a: a keyless receiver takes this peer"
    };
    out.push(case(
        "unproved_labelled_session",
        "a labelled setup with a wrong proof",
        expected,
        got,
        ok,
    ));

    let bad = frame(Header::new(Command::SessionSetup), &setup(0, None, None));
    let got = probe(t, std::slice::from_ref(&nego), &bad).await;
    let ok = refused(&got, "setup.channels");
    out.push(case(
        "setup_field_out_of_range",
        "a setup of 0 channels",
        "refused naming setup.channels",
        got,
        ok,
    ));

    out.push(during_flood(t, &vm, &nego, &unproved).await);
    out
}

/// The real migration, while `t.flood` silent connections are held open
/// and (with a key) unproved sessions labelled with its VM's name keep
/// arriving.
async fn during_flood(t: &Target, vm: &str, nego: &[u8], unproved: &[u8]) -> Case {
    let prelude = [nego.to_vec()];
    // The flood, held while the real migration runs.
    let mut flood = Vec::new();
    for _ in 0..t.flood {
        if let Ok(s) = TcpStream::connect(&t.data).await {
            flood.push(s);
        }
    }
    // And, while it runs, unproved sessions labelled with its VM's name.
    let done = tokio::sync::Notify::new();
    let spam = async {
        let mut n = 0u32;
        let mut refusals = 0u32;
        loop {
            tokio::select! {
                _ = done.notified() => break,
                got = probe(t, &prelude, unproved) => {
                    n += 1;
                    refusals += u32::from(refused(&got, "proof of the key is wrong"));
                }
            }
        }
        (n, refusals)
    };
    let real = async {
        let r = real_migration(t, vm).await;
        done.notify_one();
        r
    };
    let ((got, ok), (n, refusals)) = if t.key.is_some() {
        tokio::join!(real, spam)
    } else {
        (real.await, (0, 0))
    };
    let ok = ok && refusals == n;
    let input = format!(
        "{} silent connections held open; {n} unproved sessions labelled {vm} meanwhile",
        flood.len()
    );
    let got = format!("{got}; {refusals} of {n} unproved sessions refused");
    drop(flood);
    case(
        "migration_during_flood",
        &input,
        "a real migration completes",
        got,
        ok,
    )
}

/// The suite's closing migration.
async fn real_migration(t: &Target, vm: &str) -> (String, bool) {
    match &t.real {
        RealMigration::Direct => {
            let mem = Arc::new(crate::memory::GuestMemory::new(16 << 20).expect("16 MiB maps"));
            crate::memory::FillSpec::default().fill(&mem, 1, 1);
            let guest = crate::migration::start_guest(
                GuestKind::Sim,
                mem,
                crate::memory::Workload {
                    pattern: crate::memory::WorkloadPattern::Uniform,
                    dirty_rate: 1_000_000,
                    content: crate::memory::FillSpec::default(),
                    writers: 1,
                    seed: 1,
                },
            )
            .expect("a synthetic guest starts");
            let config = MigrationConfig {
                session_key: t.key.clone(),
                ..MigrationConfig::default()
            };
            let ctx = RunContext {
                tls: t.tls.then(crate::transport::tls::TlsClient::bound_to_key),
                ..RunContext::default()
            };
            let r = migrate(guest, &t.data, &config, &ctx).await;
            let ok = r.outcome == Outcome::Completed;
            let name = match r.outcome {
                Outcome::Completed => "completed",
                Outcome::Failed => "failed",
                Outcome::Cancelled => "cancelled",
                Outcome::Unresolved => "unresolved",
            };
            let why = r.error.map(|e| format!(": {e}")).unwrap_or_default();
            (format!("{name}{why}"), ok)
        }
        RealMigration::Agents { cluster, from, to } => {
            agents_migration(cluster, from, to, vm).await
        }
    }
}

/// A VM made on `from`, moved to `to` through the API; then every VM must be
/// where the records say: on `to`, running, and nowhere else.
async fn agents_migration(
    cluster: &crate::agent::Cluster,
    from: &str,
    to: &str,
    vm: &str,
) -> (String, bool) {
    let peers = crate::agent::peer::Peers::new(cluster);
    let (src, dst) = (
        cluster.node(from).expect("checked"),
        cluster.node(to).expect("checked"),
    );
    let spec = CreateVm {
        name: vm.to_string(),
        memory: Amount::Text("16MiB".into()),
        workload: None,
        dirty_rate: None,
        fill: None,
        guest: None,
        priority: None,
        preferred_owners: None,
        image: None,
        seed: None,
    };
    let made = peers.create_vm(src, &spec).await;
    if let Err(e) = made {
        return (format!("could not make a VM on {from}: {e}"), false);
    }
    let body = CreateMigration {
        vm: vm.to_string(),
        target: to.to_string(),
        params: MigrationParams::default(),
    };
    let id = match peers.migrate(src, &body).await {
        Ok(m) => m.id,
        Err(e) => return (format!("could not start it: {e}"), false),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let state = loop {
        match peers.migration(src, &id).await {
            Ok(m) if m.state.is_final() => break name_of(m.state),
            _ if tokio::time::Instant::now() > deadline => break "still running after 60 s".into(),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let there = peers.vm(dst, vm).await;
    let here = peers.vm(src, vm).await;
    let runs_there = there.as_ref().is_ok_and(|v| v.state == VmState::Running);
    let gone_here = matches!(
        here,
        Err(crate::agent::peer::PeerError::Api { status: 404, .. })
    );
    let ok = state == "completed" && runs_there && gone_here;
    if runs_there {
        let _ = peers
            .call(dst, reqwest::Method::DELETE, &format!("/v1/vms/{vm}"), None)
            .await;
    }
    (
        format!(
            "{state}; {vm} on {to}: {}; on {from}: {}",
            if runs_there { "running" } else { "not running" },
            if gone_here { "gone" } else { "still there" }
        ),
        ok,
    )
}
