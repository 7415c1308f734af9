//! The web console in a real headless Chromium against real agents: sign
//! in, watch a migration live (its bar only rises, its ETA only falls, the
//! live region tells of its end), and drain with the plan shown first.

use crate::common;
use common::agents::{Agents, READONLY_TOKEN, TOKEN};
use common::browser::{seconds, Browser, DOWN, ENTER, TAB};
use reqwest::{Method, StatusCode};
use serde_json::json;

const VISIBLE: &str = "return !document.getElementById('tabs').hidden";

/// Opens `node`'s console and signs in with a wrong token, then the
/// right one.
async fn sign_in(b: &Browser, c: &Agents, node: &str) {
    let url = format!("http://{}/ui/", c.agent(node).control_addr);
    b.client.goto(&url).await.unwrap();
    b.until(
        "the sign-in form",
        "return !document.getElementById('signin').hidden",
    )
    .await;
    b.type_into("#token", "not-the-token-0123456789").await;
    b.click("#signin-form button").await;
    b.until(
        "the wrong token refused",
        "return document.getElementById('signin-error').textContent.includes('neither')",
    )
    .await;
    b.shot("signin-refused").await;
    b.type_into("#token", TOKEN).await;
    b.click("#signin-form button").await;
    b.until("the console", VISIBLE).await;
    // The session cookie is HttpOnly: script cannot read it.
    let cookies = b.js("return document.cookie").await;
    assert!(!cookies.to_string().contains("ferry_session"), "{cookies}");
}

#[test]
fn a_migration_started_in_the_console_is_watched_to_its_end() {
    let _serial = common::serial();
    let ro = "readonly_token_file = \"readonly.token\"";
    let Some(c) = Agents::start_with("console-migrate", ro, &[("a", ""), ("b", "")]) else {
        return;
    };
    c.create_busy_web();
    c.rt.block_on(async {
        // The console's files take no token and come under the CSP; the
        // API still wants one, and no path around it reaches it.
        let base = format!("http://{}", c.agent("a").control_addr);
        let get = |p: &str| reqwest::get(format!("{base}{p}"));
        let page = get("/ui/").await.unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        let csp = page.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
        assert_eq!(page.headers()["x-content-type-options"], "nosniff");
        for (p, want) in [("/v1/node", 401), ("/ui/..%2Fv1%2Fnode", 401), ("/uix", 401), ("/ui/main.js", 200)] {
            assert_eq!(get(p).await.unwrap().status().as_u16(), want, "{p}");
        }
        let Some(b) = Browser::start("console-migrate").await else {
            return;
        };
        sign_in(&b, &c, "a").await;
        // Only the keyboard: to the VMs view, to web's Migrate button, and
        // through the dialog.
        b.tab_to("the VMs tab", "e.dataset.view === 'vms'").await;
        b.keys(ENTER).await;
        b.until(
            "web in the VMs table",
            "return [...document.querySelectorAll('#vms-table tbody th')].some(t => t.textContent === 'web')",
        )
        .await;
        b.tab_to("web's Migrate button", "e.getAttribute('aria-label') === 'Migrate web'")
            .await;
        b.keys(ENTER).await;
        b.until("the dialog", "return document.getElementById('dialog').open")
            .await;
        // The target: the best node, a, b.
        b.keys(&format!("{DOWN}{DOWN}")).await;
        b.keys(TAB).await;
        b.keys("16MB/s").await;
        b.keys(TAB).await;
        // The codec: the node's, auto, none.
        b.keys(&format!("{DOWN}{DOWN}")).await;
        let asked = b
            .js("return [...document.querySelectorAll('#dialog-body select, #dialog-body input')].map(e => e.value)")
            .await;
        assert_eq!(asked, json!(["b", "16MB/s", "none"]));
        b.tab_to("the Migrate button", "e.id === 'dialog-ok'").await;
        b.keys(ENTER).await;
        b.until("the dialog closed", "return !document.getElementById('dialog').open")
            .await;
        b.click("[data-view=migrations]").await;
        b.until("the running card", "return !!document.querySelector('#running .card')")
            .await;
        b.shot("migration-running").await;
        // Every 100 ms until it ends: the bar never falls, the ETA never
        // rises.
        let (mut pct, mut eta, mut samples) = (0.0f64, f64::INFINITY, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            assert!(std::time::Instant::now() < deadline, "the migration ran 60 s");
            let v = b
                .js("const c = document.querySelector('#running .card'); if (!c) return null; \
                     return [c.querySelector('progress').value, c.querySelectorAll('dd')[4].textContent]")
                .await;
            let Some(v) = v.as_array() else { break };
            let p = v[0].as_f64().unwrap();
            assert!(p >= pct, "the bar fell from {pct} to {p}");
            pct = p;
            if let Some(s) = seconds(v[1].as_str().unwrap()) {
                // Shown to a tenth of a second, or whole seconds from 10 s.
                assert!(s <= eta + 0.05, "the ETA rose from {eta} to {s}");
                eta = s;
                samples += 1;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(samples >= 5, "too few ETA readings: {samples}");
        assert!(pct >= 50.0, "the bar rose only to {pct} %");
        b.until(
            "the completion announced",
            "return document.getElementById('announce').textContent.includes('Migration of web to node b completed')",
        )
        .await;
        b.click("[data-view=vms]").await;
        b.until(
            "web on node b",
            "return [...document.querySelectorAll('#vms-table tbody tr')].some(r => r.children[1].textContent === 'web' && r.children[2].textContent === 'b')",
        )
        .await;
        b.click("[data-view=migrations]").await;
        b.until("the history row", "return document.querySelector('#history tbody tr') !== null")
            .await;
        b.shot("migration-history").await;
        // Its report: the codec asked for, and what it compressed.
        let codec = b
            .js("return document.querySelector('#history tbody tr').children[7].textContent")
            .await;
        assert_eq!(codec, json!("none (none compressed)"));
        // Signed out, then in with the read-only token: a view without
        // actions, and the API refuses a change all the same.
        b.click("#sign-out").await;
        b.until("the sign-in form again", "return !document.getElementById('signin').hidden")
            .await;
        b.type_into("#token", READONLY_TOKEN).await;
        b.click("#signin-form button").await;
        b.until("the read-only console", VISIBLE).await;
        assert!(b.text("#scope").await.contains("read-only"));
        b.click("[data-view=vms]").await;
        b.until("web listed", "return document.querySelectorAll('#vms-table tbody tr').length === 1")
            .await;
        let hidden = b
            .js("return [...document.querySelectorAll('button.admin, input.admin')].every(e => e.offsetParent === null)")
            .await;
        assert_eq!(hidden, json!(true), "a read-only view shows no action");
        let status = b
            .js("return (await fetch('/v1/migrations', {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify({vm: 'web', target: 'a'})})).status")
            .await;
        assert_eq!(status, json!(403));
        b.close().await;
    });
}

/// Node a's drain step states in the console's drain card, and its state.
const DRAIN: &str = "const c = [...document.querySelectorAll('#operations .card')].find(c => c.querySelector('.title').textContent === 'drain of node a'); \
     if (!c) return null; \
     return [c.querySelector('header .state').textContent, \
     [...c.querySelectorAll('tbody tr')].map(r => r.children[4].textContent.split(':')[0])]";

/// Whether every VM row says `running` (on `node`, if given).
fn all_running(node: Option<&str>) -> String {
    let on = node.map_or(String::new(), |n| {
        format!(" && r.children[2].textContent === '{n}'")
    });
    format!("const rows = [...document.querySelectorAll('#vms-table tbody tr')]; \
             return rows.length === 4 && rows.every(r => r.children[4].textContent === 'running'{on})")
}

#[test]
fn a_drain_shows_its_plan_first_survives_a_reload_cancels_and_fails_back() {
    let _serial = common::serial();
    let slow = "max_concurrent_migrations = 1\nmax_bandwidth = \"8MB/s\"";
    let Some(c) = Agents::start("console-drain", &[("a", slow), ("b", ""), ("c", "")]) else {
        return;
    };
    for i in 1..=4 {
        let body = json!({"name": format!("vm{i}"), "memory": "32MiB", "workload": "hot:4MiB", "dirty_rate": "2MB/s", "fill": "random:1"});
        let (s, v) = c.call(Method::POST, "a", "/v1/vms", Some(body));
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    c.rt.block_on(async {
        let Some(b) = Browser::start("console-drain").await else {
            return;
        };
        // Any agent's console shows the whole cluster: this one is b's.
        sign_in(&b, &c, "b").await;
        b.until(
            "node a's four VMs",
            "return [...document.querySelectorAll('#nodes-table tbody tr')].some(r => r.children[0].textContent === 'a' && r.children[3].textContent === '4')",
        )
        .await;
        b.click("button[aria-label='Drain node a']").await;
        b.until("the plan", "return document.querySelectorAll('#dialog-body tbody tr').length === 4")
            .await;
        let plan = b.text("#dialog-body").await;
        assert!(plan.contains("at most 1 at once"), "{plan}");
        // Nothing moved yet: the plan changes nothing.
        let state = b
            .js("const r = await fetch('/v1/nodes/a'); return (await r.json()).state")
            .await;
        assert_eq!(state, "active");
        b.shot("drain-plan").await;
        b.click("#dialog-ok").await;
        b.until("the drain started", "return !document.getElementById('dialog').open")
            .await;
        b.click("[data-view=operations]").await;
        // Never more than the limit running, until one VM has moved.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let done_before = loop {
            assert!(std::time::Instant::now() < deadline, "no VM moved in 60 s");
            let v = b.js(DRAIN).await;
            if let Some(steps) = v[1].as_array() {
                let count = |s: &str| steps.iter().filter(|x| x.as_str() == Some(s)).count();
                assert!(count("running") <= 1, "{v}");
                assert_eq!(v[0], "running", "it ended before the test could cancel it: {v}");
                if count("completed") >= 1 {
                    break count("completed");
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        b.shot("drain-running").await;
        // A reload mid-drain: still signed in, the same drain, no step
        // gone back.
        b.client.refresh().await.unwrap();
        b.until("the console again", VISIBLE).await;
        b.until("the drain again", &format!("const v = (() => {{ {DRAIN} }})(); return !!v && v[1].filter(s => s === 'completed').length >= {done_before}")).await;
        // Cancel it mid-way: every VM then runs, where it was left.
        b.click("button[aria-label='Cancel the drain of node a']").await;
        b.until("the cancel dialog", "return document.getElementById('dialog').open")
            .await;
        b.click("#dialog-ok").await;
        b.until("the cancel asked", "return !document.getElementById('dialog').open")
            .await;
        b.until("the drain cancelled", &format!("const v = (() => {{ {DRAIN} }})(); return !!v && v[0] === 'cancelled'")).await;
        let moved = b.js(DRAIN).await[1]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s.as_str() == Some("completed"))
            .count();
        assert!((1..4).contains(&moved), "cancelled mid-way: {moved} moved");
        b.click("[data-view=vms]").await;
        b.until("every VM running", &all_running(None)).await;
        // Resume with failback: the dialog lists what comes back.
        b.click("[data-view=nodes]").await;
        b.click("button[aria-label='Resume node a']").await;
        b.until("the resume dialog", "return document.getElementById('dialog').open")
            .await;
        let listed = b.text("#dialog-body ul").await;
        assert_eq!(listed.matches("comes back from node").count(), moved, "{listed}");
        b.shot("resume-failback").await;
        b.click("#dialog-ok").await;
        b.until("the resume asked", "return !document.getElementById('dialog').open")
            .await;
        b.click("[data-view=vms]").await;
        b.until("every VM back on a", &all_running(Some("a"))).await;
        b.close().await;
    });
}

#[test]
fn a_rolling_update_from_the_console_stops_at_a_failing_hook_with_that_node_paused() {
    let _serial = common::serial();
    let hook = "[defaults]\nupdate_hook = [\"sh\", \"-c\"]";
    let nodes = [("a", ""), ("b", ""), ("c", "")];
    let Some(c) = Agents::start_with("console-rolling", hook, &nodes) else {
        return;
    };
    let body = json!({"name": "vm-b", "memory": "16MiB", "workload": "idle"});
    let (s, v) = c.call(Method::POST, "b", "/v1/vms", Some(body));
    assert_eq!(s, StatusCode::CREATED, "{v}");
    c.rt.block_on(async {
        let Some(b) = Browser::start("console-rolling").await else {
            return;
        };
        sign_in(&b, &c, "c").await;
        // The order shown is the nodes the console knows: all three first.
        b.until("three nodes", "return document.querySelectorAll('#nodes-table tbody tr').length === 3")
            .await;
        b.click("[data-view=operations]").await;
        b.click("#rolling-update").await;
        b.until("the plan", "return document.getElementById('dialog').open")
            .await;
        let plan = b.text("#dialog-body").await;
        assert!(plan.contains("in this order: a, b, c"), "{plan}");
        // Each node's drain plan: b's VM goes to a or c.
        assert!(plan.contains("node b: drain, run the command, resume (moving vm-b →"), "{plan}");
        assert!(plan.contains("node a: drain, run the command, resume (no VM to move)"), "{plan}");
        // The command fails on node b only.
        b.type_into("#ru-command", "test \"$FERRY_NODE\" != b").await;
        b.click("#dialog-ok").await;
        b.until("the run asked", "return !document.getElementById('dialog').open")
            .await;
        b.until(
            "the run failed",
            "return document.querySelector('#update-run .card header .state')?.textContent === 'failed'",
        )
        .await;
        let phases = b
            .js("return [...document.querySelectorAll('#update-run tbody tr')].map(r => [r.children[0].textContent, r.children[1].textContent.split(' ')[0]])")
            .await;
        assert_eq!(phases, json!([["a", "done"], ["b", "failed"], ["c", "pending"]]));
        b.shot("rolling-update-failed").await;
        // Node b is left paused, its update's output under Operations.
        b.until(
            "b's failed update",
            "return [...document.querySelectorAll('#operations .card')].some(c => c.querySelector('.title').textContent === 'update of node b' && c.querySelector('header .state').textContent === 'failed')",
        )
        .await;
        // A schedule instead of a run now: shown, then removed.
        b.click("#rolling-update").await;
        b.until("the dialog again", "return document.getElementById('dialog').open")
            .await;
        b.type_into("#ru-command", "true").await;
        b.type_into("#ru-schedule", "every 24h").await;
        b.click("#dialog-ok").await;
        b.until(
            "the schedule shown",
            "return document.getElementById('update-schedule').textContent.includes('rolling update \"true\" (every 24h, UTC)')",
        )
        .await;
        b.click("#update-schedule button").await;
        b.until("the remove dialog", "return document.getElementById('dialog').open")
            .await;
        b.click("#dialog-ok").await;
        b.until(
            "the schedule gone",
            "return document.getElementById('update-schedule').textContent === ''",
        )
        .await;
        b.click("[data-view=nodes]").await;
        b.until(
            "node b paused",
            "return [...document.querySelectorAll('#nodes-table tbody tr')].some(r => r.children[0].textContent === 'b' && r.children[1].textContent === 'paused')",
        )
        .await;
        b.close().await;
    });
}
