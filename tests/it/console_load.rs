//! The console under load, measured (a benchmark, not a check: ignored by
//! `cargo test`): 200 small VMs on 5 agents, 20 migrations running (4 per
//! node, each node's limit), one browser on the Migrations view. Prints
//! the events and bytes per second its stream carries, the agents' CPU
//! with and without it, and the page's longest main-thread task.
//! `cargo test --release --test it console_load -- --ignored --nocapture`

use crate::common;
use common::agents::{Agents, TOKEN};
use common::browser::Browser;
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

/// This process's CPU time (every agent, guest and migration in it).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime, fields 14 and 15 (11 and 12 after the name).
    let ticks = f[11] + f[12];
    Duration::from_millis(ticks * 10)
}

/// Reads `url`'s event stream for `window`: events and bytes.
async fn count(url: &str, window: Duration) -> (u64, u64) {
    let mut resp = reqwest::Client::new()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    // The whole state a new stream starts with is not the steady rate.
    let settled = Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(Some(_))) = tokio::time::timeout_at(settled.into(), resp.chunk()).await {}
    let (mut events, mut bytes) = (0, 0);
    let end = Instant::now() + window;
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(end.into(), resp.chunk()).await {
        bytes += chunk.len() as u64;
        events += chunk.windows(7).filter(|w| w == b"event: ").count() as u64;
    }
    (events, bytes)
}

#[test]
#[ignore]
fn console_load() {
    let _serial = common::serial();
    let limit = "max_concurrent_migrations = 4\nmemory_capacity = \"8GiB\"";
    let names = ["a", "b", "c", "d", "e"];
    let nodes: Vec<(&str, &str)> = names.iter().map(|n| (*n, limit)).collect();
    let Some(c) = Agents::start("console-load", &nodes) else {
        return;
    };
    for (i, node) in names.iter().enumerate() {
        for j in 0..40 {
            let body = json!({"name": format!("vm-{node}-{j}"), "memory": "8MiB", "workload": "hot:1MiB", "dirty_rate": "1MB/s"});
            let (s, v) = c.call(Method::POST, node, "/v1/vms", Some(body));
            assert_eq!(s, StatusCode::CREATED, "{v}");
        }
        // Four migrations out of each node, slow enough to outlast the
        // measurement: 8 MiB at 128 kB/s.
        for j in 0..4 {
            let target = names[(i + 1) % names.len()];
            let body = json!({"vm": format!("vm-{node}-{j}"), "target": target, "max_bandwidth": "128kB/s", "codec": "none"});
            let (s, v) = c.call(Method::POST, node, "/v1/migrations", Some(body));
            assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let window = Duration::from_secs(20);
    // The agents without any stream.
    let before = cpu();
    std::thread::sleep(window);
    let quiet = cpu() - before;
    let url = format!("http://{}/v1/cluster/events", c.agent("a").control_addr);
    c.rt.block_on(async {
        let Some(b) = Browser::start("console-load").await else {
            return;
        };
        let page = format!("http://{}/ui/", c.agent("a").control_addr);
        b.sign_in(&page, TOKEN).await;
        b.js("window.__long = []; window.__render = []; new PerformanceObserver(l => window.__long.push(...l.getEntries().map(e => e.duration))).observe({type: 'longtask', buffered: true}); new PerformanceObserver(l => window.__render.push(...l.getEntries().filter(e => e.name === 'ferry-render').map(e => e.duration))).observe({type: 'measure'}); return true")
            .await;
        b.click("[data-view=migrations]").await;
        b.until("20 running", "return document.querySelectorAll('#running .card').length === 20")
            .await;
        // What loading and the first renders took is not the steady state.
        b.js("window.__long = []; window.__render = []; return true").await;
        let before = cpu();
        let (events, bytes) = count(&url, window).await;
        let busy = cpu() - before;
        let long = b
            .js("return [window.__long.length, Math.max(0, ...window.__long)]")
            .await;
        let render = b
            .js("const r = window.__render.slice().sort((a, b) => a - b); return [r.length, r[Math.floor(r.length / 2)], r[r.length - 1]]")
            .await;
        b.shot("console-load").await;
        let running = b
            .js("return document.querySelectorAll('#running .card').length")
            .await;
        let secs = window.as_secs_f64();
        println!("200 VMs on 5 agents, {running} migrations running, one browser on the Migrations view, over {secs} s:");
        println!("  the cluster stream: {:.0} events/s, {:.1} kB/s", events as f64 / secs, bytes as f64 / secs / 1e3);
        println!(
            "  the process's CPU (5 agents, 200 guests, 20 migrations): {:.0} % of a core without the console, {:.0} % with it and a second stream",
            100.0 * quiet.as_secs_f64() / secs,
            100.0 * busy.as_secs_f64() / secs
        );
        println!("  the page's long tasks (over 50 ms): {} of them, the longest {} ms", long[0], long[1]);
        println!(
            "  the page's renders: {} in all, median {:.1} ms, longest {:.1} ms",
            render[0], render[1].as_f64().unwrap_or(0.0), render[2].as_f64().unwrap_or(0.0)
        );
        b.close().await;
    });
}
