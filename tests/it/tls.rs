//! Migrations over TLS 1.3: byte for byte with the key's proofs bound to
//! each channel, or with a pinned certificate; a wrong pin, a plain peer on
//! either side, and a middle that terminates TLS on both sides and relays
//! are all refused before a page moves.

use crate::common;

use common::*;
use ferry::cpu::CpuMeter;
use ferry::memory::{FillSpec, WorkloadPattern};
use ferry::migration::auth::SessionKey;
use ferry::migration::{MigrationConfig, Outcome};
use ferry::transport::tls::{TlsClient, TlsServer};
use ferry::transport::{ReceiverConfig, RunContext};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;

fn key() -> SessionKey {
    SessionKey(b"a shared key of 32 bytes, really".to_vec())
}

#[test]
fn a_keyed_tls_migration_moves_memory_byte_for_byte() {
    let _serial = serial();
    let g = guest(
        64 * MIB,
        FillSpec::default(),
        WorkloadPattern::Hot { bytes: 8 * MIB },
        20_000_000,
    );
    let config = MigrationConfig {
        session_key: Some(key()),
        leave_paused: true,
        channels: 4,
        ..MigrationConfig::default()
    };
    let receiver = ReceiverConfig {
        key: Some(key()),
        tls: Some(TlsServer::ephemeral().unwrap()),
        ..ReceiverConfig::default()
    };
    let ctx = RunContext {
        tls: Some(TlsClient::bound_to_key()),
        ..RunContext::default()
    };
    let (src, dst) =
        ferry::transport::migrate_over_loopback(g.clone(), &config, ctx, receiver).unwrap();
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(src.encrypted && src.authenticated);
    let dst = dst.unwrap();
    assert!(dst.report.encrypted && dst.report.authenticated);
    assert_eq!(
        first_difference(g.memory(), dst.memory.as_ref().unwrap()),
        None
    );
}

#[test]
fn a_pinned_certificate_is_checked_and_plain_peers_are_told() {
    let _serial = serial();
    let server = TlsServer::ephemeral().unwrap();
    let run = |tls: Option<TlsClient>, receiver_tls: Option<TlsServer>| {
        let g = guest(8 * MIB, FillSpec::default(), WorkloadPattern::Idle, 0);
        let config = MigrationConfig::default();
        let receiver = ReceiverConfig {
            tls: receiver_tls,
            ..ReceiverConfig::default()
        };
        let ctx = RunContext {
            tls,
            ..RunContext::default()
        };
        let (src, _) =
            ferry::transport::migrate_over_loopback(g.clone(), &config, ctx, receiver).unwrap();
        (src, g)
    };
    // The right pin, no key: encrypted, not authenticated by a key.
    let (src, _) = run(
        Some(TlsClient::pinned_der(&server.certificate)),
        Some(server.clone()),
    );
    assert_eq!(src.outcome, Outcome::Completed, "{:?}", src.error);
    assert!(src.encrypted && !src.authenticated);
    // Another receiver's certificate.
    let other = TlsServer::ephemeral().unwrap();
    let (src, g) = run(
        Some(TlsClient::pinned_der(&other.certificate)),
        Some(server.clone()),
    );
    assert_eq!(src.outcome, Outcome::Failed);
    assert!(
        src.error.as_deref().unwrap().contains("not the pinned one"),
        "{:?}",
        src.error
    );
    assert!(g.is_running());
    // Plain source, TLS receiver; TLS source, plain receiver.
    let (src, _) = run(None, Some(server.clone()));
    assert!(
        src.error.as_deref().unwrap().contains("takes TLS only"),
        "{:?}",
        src.error
    );
    let (src, g) = run(Some(TlsClient::pinned_der(&server.certificate)), None);
    assert_eq!(src.outcome, Outcome::Failed);
    assert!(
        src.error.as_deref().unwrap().contains("--tls"),
        "{:?}",
        src.error
    );
    assert!(g.is_running());
    // TLS known by neither a pin nor a key is refused up front.
    let (src, _) = run(Some(TlsClient::bound_to_key()), Some(server));
    assert!(
        src.error.as_deref().unwrap().contains("needs a shared key"),
        "{:?}",
        src.error
    );
}

/// A middle that terminates the source's TLS with a certificate of its own
/// and opens its own TLS session to the receiver, relaying the plaintext.
async fn relay(listen: tokio::net::TcpListener, upstream: String) {
    let mine = TlsServer::ephemeral().unwrap();
    let onward = TlsClient::bound_to_key();
    loop {
        let Ok((tcp, _)) = listen.accept().await else {
            return;
        };
        let (mine, onward, upstream) = (mine.clone(), onward.clone(), upstream.clone());
        tokio::spawn(async move {
            let Ok((down, _)) = mine.accept(tcp).await else {
                return;
            };
            let up = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let Ok((up, _)) = onward.connect(up).await else {
                return;
            };
            let (mut dr, mut dw) = tokio::io::split(down);
            let (mut ur, mut uw) = tokio::io::split(up);
            let a = async {
                let _ = tokio::io::copy(&mut dr, &mut uw).await;
                let _ = uw.shutdown().await;
            };
            let b = async {
                let _ = tokio::io::copy(&mut ur, &mut dw).await;
                let _ = dw.shutdown().await;
            };
            tokio::join!(a, b);
        });
    }
}

#[test]
fn a_middle_relaying_between_two_tls_sessions_fails_every_proof() {
    let _serial = serial();
    let rt = ferry::transport::runtime("dst", 2, &CpuMeter::new()).unwrap();
    let receiver = rt
        .block_on(ferry::transport::Receiver::bind(
            "127.0.0.1:0",
            ReceiverConfig {
                key: Some(key()),
                tls: Some(TlsServer::ephemeral().unwrap()),
                ..ReceiverConfig::default()
            },
        ))
        .unwrap();
    let upstream = receiver.local_addr().unwrap().to_string();
    let stats = receiver.stats();
    let recv_ctx = RunContext::default();
    let incoming = rt.spawn(receiver.receive_one(recv_ctx.clone()));
    let listen = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let middle = listen.local_addr().unwrap().to_string();
    rt.spawn(relay(listen, upstream));
    let g = guest(8 * MIB, FillSpec::default(), WorkloadPattern::Idle, 0);
    let gd: Arc<dyn ferry::migration::MigratableGuest> = g.clone();
    let config = MigrationConfig {
        session_key: Some(key()),
        ..MigrationConfig::default()
    };
    let ctx = RunContext {
        tls: Some(TlsClient::bound_to_key()),
        ..RunContext::default()
    };
    let src = rt.block_on(ferry::transport::migrate(gd, &middle, &config, &ctx));
    assert_eq!(src.outcome, Outcome::Failed, "{src:?}");
    assert!(
        src.error
            .as_deref()
            .unwrap()
            .contains("proof of the key is wrong"),
        "{:?}",
        src.error
    );
    assert_eq!(src.pages.total, 0, "no page crossed the middle");
    assert!(g.is_running());
    // The receiver refused the relayed session as unproved: it keeps no
    // report of it, and allocated nothing.
    assert_eq!(
        stats.refused_for(ferry::transport::Refusal::Unauthenticated),
        1
    );
    recv_ctx.cancel.cancel();
    assert!(rt.block_on(incoming).unwrap().is_none());
}
