//! An agent's lifetime: binding its listeners, registering in etcd,
//! spawning its tasks, and its clean stop.

use super::*;
use tokio_util::task::TaskTracker;

/// The API's TLS acceptor from the node's certificate and key, or `None`
/// with `insecure_api`.
pub(super) fn api_tls(node: &Node) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let Some(cert) = &node.spec.api_cert else {
        return Ok(None);
    };
    let name = &node.spec.name;
    let key_file = node.spec.api_key_file.as_ref().ok_or_else(|| {
        format!("node {name}: the cluster file names its tls_cert but no tls_key, which its agent needs")
    })?;
    let key = crate::migration::auth::read_secret_file(key_file)
        .map_err(|e| format!("node {name}: tls_key: {e}"))?;
    let server = crate::transport::tls::TlsServer::from_der_and_pem_key(cert, &key)
        .map_err(|e| format!("node {name}: {e}"))?;
    Ok(Some(server.acceptor()))
}

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    /// The node it runs.
    pub node: Arc<Node>,
    /// Where its control API listens.
    pub control_addr: SocketAddr,
    /// Where it takes incoming migrations.
    pub data_addr: SocketAddr,
    stop: CancellationToken,
    /// Its long-running tasks, ended together by `stop`.
    tasks: TaskTracker,
    /// The task renewing the node's lease, and its own stop
    /// (it renews until the other tasks have ended).
    keep: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    /// The writer of the node's own records, and its stop.
    journal: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl AgentHandle {
    /// The agent's stop as SIGTERM asks for it: drains the node (its VMs move
    /// to the other nodes), then shuts down once it hosts nothing, or at once
    /// when the stop is forced (`POST /v1/node/stop` with `force`), naming
    /// the VMs discarded.
    pub async fn drain_and_shutdown(self) -> crate::agent::StopEnd {
        self.node.stop.ask(false);
        let end = self.node.drain_for_stop().await;
        if let crate::agent::StopEnd::Forced(vms) = &end {
            if !vms.is_empty() {
                tracing::error!(?vms, "stopping with force: these VMs are discarded");
            }
            // Discarded on purpose: not restarted elsewhere either.
            for vm in vms {
                let unresolved = self.node.unresolved_of(vm);
                if let Err(e) = self.node.forget_record(vm, unresolved).await {
                    tracing::warn!(%vm, error = %e, "deleting the discarded VM's record failed");
                }
            }
        }
        self.shutdown().await;
        end
    }

    /// Stops taking requests and migrations and waits for the listeners to
    /// close. Outgoing migrations in flight are cancelled first, which
    /// leaves each guest running here; whatever it hosts is discarded.
    pub async fn shutdown(self) {
        self.node.cancel_all();
        self.node.close_operations().await;
        self.node.wait_idle(Duration::from_secs(30)).await;
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        // What the node recorded, and the record edits still waiting for
        // etcd, land before its lease goes.
        let flushed = async {
            match self.node.journal.get() {
                Some(j) => j.flush(Duration::from_secs(10)).await,
                None => true,
            }
        };
        let (flushed, ()) = tokio::join!(flushed, self.node.tasks.end(Duration::from_secs(10)));
        if !flushed {
            tracing::error!("stopping before every record reached etcd");
        }
        if let Some((stop, task)) = self.journal {
            stop.cancel();
            let _ = task.await;
        }
        // A clean stop: the node is known gone at once.
        if let Some((stop, task)) = self.keep {
            stop.cancel();
            let _ = task.await;
        }
        if let Some(live) = self.node.liveness.get() {
            live.revoke().await;
        }
    }
}

/// Starts node `name` of `cluster`: binds its control and data addresses
/// from the cluster file and serves until [`AgentHandle::shutdown`].
pub async fn serve_agent(cluster: Cluster, name: &str) -> std::io::Result<AgentHandle> {
    serve_agent_with(cluster, name, None).await
}

/// As [`serve_agent`], injecting `fault` into incoming migrations (tests of
/// the hand-off rules; the hidden `--fault` option of `ferry agent`).
pub async fn serve_agent_with(
    cluster: Cluster,
    name: &str,
    fault: Option<crate::migration::fault::Fault>,
) -> std::io::Result<AgentHandle> {
    let Some(store) = cluster.store.clone() else {
        return Err(std::io::Error::other(format!(
            "{}: no `etcd = [\"host:port\", ...]`: agents keep the cluster's state in etcd (standalone hosts migrate with `ferry send` and `ferry receive`)",
            cluster.path.display()
        )));
    };
    // Connections in flight on both listeners and the guests' files must
    // not run out of descriptors: take all the hard limit allows.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the descriptor limit");
    }
    let node = Node::new(cluster, name).map_err(std::io::Error::other)?;
    let stop = CancellationToken::new();
    let receiver = bind_receiver(&node, fault).await?;
    let data_addr = receiver.local_addr()?;
    let _ = node.refusals.set(receiver.stats());
    let api_tls = api_tls(&node).map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(&node.spec.control).await?;
    let control_addr = listener.local_addr()?;
    // Registered once both listeners are bound, so a failed start leaves
    // no lease behind.
    let keep = Some(register(&store, &node).await?);
    // The journal writes until the lease is revoked, after the other tasks.
    let journal_stop = CancellationToken::new();
    let journal_task = node.journal.get().cloned().map(|j| {
        let until = journal_stop.clone();
        tokio::spawn(async move { j.run(until).await })
    });
    let tasks = spawn_tasks(&node, receiver, listener, api_tls, &stop);
    tracing::info!(node = %node.spec.name, control = %control_addr, data = %data_addr, "agent running");
    node.start_mode();
    Ok(AgentHandle {
        node,
        control_addr,
        data_addr,
        stop,
        tasks,
        keep,
        journal: journal_task.map(|t| (journal_stop, t)),
    })
}

/// Binds the node's data address: every session proves the cluster's key
/// and passes the node's admission; a guest that arrives joins the node.
pub(super) async fn bind_receiver(
    node: &Arc<Node>,
    fault: Option<crate::migration::fault::Fault>,
) -> std::io::Result<Receiver> {
    let weak = Arc::downgrade(node);
    let weak_go = weak.clone();
    let weak_base = weak.clone();
    Receiver::bind(
        &node.spec.data,
        ReceiverConfig {
            max_memory: node.spec.memory_capacity,
            // Every session proves the cluster's key, or is refused; with
            // TLS the proofs are bound to each channel's TLS session.
            key: Some(crate::migration::auth::SessionKey(node.cluster.key.clone())),
            tls: if node.cluster.tls {
                Some(crate::transport::tls::TlsServer::ephemeral().map_err(std::io::Error::other)?)
            } else {
                None
            },
            unauthenticated: crate::transport::Unauthenticated::Refuse,
            fault,
            admit: Some(Arc::new(move |session, setup| match weak.upgrade() {
                Some(node) => node.admit_incoming(session, setup),
                None => Err("the agent is shutting down".into()),
            })),
            delta_base: Some(Arc::new(move |setup| match weak_base.upgrade() {
                Some(node) => node.delta_base(setup),
                None => Err("the agent is shutting down".into()),
            })),
            on_go: Some(Arc::new(move |session, _label, guest, resumed| {
                if let Some(node) = weak_go.upgrade() {
                    node.vm_arrived(session, guest, resumed);
                }
            })),
            ..ReceiverConfig::default()
        },
    )
    .await
}

/// Registers the node's lease in etcd, reads its records back and keeps
/// the lease renewed until the returned token is cancelled.
pub(super) async fn register(
    store: &crate::agent::store::StoreConfig,
    node: &Arc<Node>,
) -> std::io::Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let live = crate::agent::store::Liveness::register(store, &node.spec)
        .await
        .map_err(|e| std::io::Error::other(format!("registering in etcd: {e}")))?;
    let live = Arc::new(live);
    let _ = node.liveness.set(live.clone());
    let _ = node
        .journal
        .set(Arc::new(crate::agent::journal::Journal::new(
            live.etcd().clone(),
            live.prefix(),
            &node.spec.name,
        )));
    if let Err(e) = node.restore().await {
        live.revoke().await;
        return Err(std::io::Error::other(format!(
            "reading this node's records in etcd: {e}"
        )));
    }
    if let Err(e) = node.adopt_records().await {
        live.revoke().await;
        return Err(std::io::Error::other(format!(
            "reading this node's VMs in etcd: {e}"
        )));
    }
    // A superseded copy held again never runs here: its VM starts
    // elsewhere if its record still names this node.
    node.restart_kept_superseded();
    let until = CancellationToken::new();
    let task = tokio::spawn({
        let until = until.clone();
        let hooks: Arc<dyn crate::agent::fence::FenceHooks> = node.clone();
        async move { live.keep(until, hooks).await }
    });
    Ok((until, task))
}

/// Starts the node's tasks: keeping copies, the mirror and coordinator,
/// the receiver and what arrives through it, and the control API.
pub(super) fn spawn_tasks(
    node: &Arc<Node>,
    receiver: Receiver,
    listener: tokio::net::TcpListener,
    api_tls: Option<tokio_rustls::TlsAcceptor>,
    stop: &CancellationToken,
) -> TaskTracker {
    let tasks = TaskTracker::new();
    tasks.spawn(node.clone().keep_copies(stop.clone()));
    tasks.spawn(super::events::publish(node.clone(), stop.clone()));
    if let Some(live) = node.liveness.get().cloned() {
        let mirror = Arc::new(crate::agent::mirror::Mirror::new(
            live.etcd().clone(),
            live.prefix(),
        ));
        let _ = node.mirror.set(mirror.clone());
        tasks.spawn({
            let (mirror, stop) = (mirror.clone(), stop.clone());
            async move { mirror.run(stop).await }
        });
        tasks.spawn(crate::agent::coordinator::run(
            node.clone(),
            live,
            mirror,
            stop.clone(),
        ));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ctx = RunContext {
        cancel: stop.child_token(),
        ..RunContext::default()
    };
    tasks.spawn(receiver.serve(ctx, tx));
    let n = node.clone();
    tasks.spawn(async move {
        while let Some(incoming) = rx.recv().await {
            n.incoming_done(incoming);
        }
    });
    let app = router(node.clone());
    let (stats, limits) = (node.api_stats.clone(), node.api_limits);
    tasks.spawn(crate::agent::listen::serve_api(
        listener,
        app,
        api_tls,
        limits,
        stats,
        stop.clone(),
    ));
    tasks
}
