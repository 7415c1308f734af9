//! A real headless Chromium for the console's tests, driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`) by fantoccini.

use fantoccini::{Client, ClientBuilder, Locator};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// chromedriver and one browser session through it; both end on drop.
pub struct Browser {
    pub client: Client,
    _driver: Group,
    _profile: super::agents::Dir,
}

/// chromedriver in a process group of its own, with the browsers it
/// starts: all killed on drop, whatever ends the test (a panic included).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.wait();
    }
}

impl Browser {
    /// A new headless browser with an empty profile; `None` (the test
    /// skips, or fails under CI) where Chromium or chromedriver is missing.
    pub async fn start(test: &str) -> Option<Self> {
        if !super::tool_available("chromedriver", "chromedriver (Debian's chromium-driver)")
            || !super::tool_available("chromium", "Chromium (Debian's chromium)")
        {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own process group, with the browsers it starts: all end
        // together, whatever ends the test.
        use std::os::unix::process::CommandExt;
        let driver = Group(
            Command::new("chromedriver")
                .process_group(0)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = super::agents::Dir::new(&format!("{test}-chromium"));
        // The flags this machine's closed network wants (no background
        // connections), as root (no sandbox).
        let args = serde_json::json!([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
            format!("--user-data-dir={}", profile.path().display()),
        ]);
        let caps = serde_json::json!({
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args }
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let conn = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(conn)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a browser session");
        Some(Browser {
            client,
            _driver: driver,
            _profile: profile,
        })
    }

    /// Opens the console at `url` and signs in with `token`.
    pub async fn sign_in(&self, url: &str, token: &str) {
        self.client.goto(url).await.expect(url);
        self.until(
            "the sign-in form",
            "return !document.getElementById('signin').hidden",
        )
        .await;
        self.type_into("#token", token).await;
        self.click("#signin-form button").await;
        self.until(
            "the console",
            "return !document.getElementById('tabs').hidden",
        )
        .await;
    }

    /// Runs `js` in the page; its JSON answer.
    pub async fn js(&self, js: &str) -> serde_json::Value {
        self.client.execute(js, vec![]).await.expect(js)
    }

    /// Waits (at most 30 s) until `js` answers `true`.
    pub async fn until(&self, what: &str, js: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.js(js).await == serde_json::Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                self.shot(&format!("timeout-{}", what.replace(' ', "-")))
                    .await;
                panic!("waited 30 s for {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element `css` finds.
    pub async fn click(&self, css: &str) {
        let el = self.client.find(Locator::Css(css)).await.expect(css);
        el.click().await.expect(css);
    }

    /// Types `text` into the element `css` finds.
    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self.client.find(Locator::Css(css)).await.expect(css);
        el.clear().await.expect(css);
        el.send_keys(text).await.expect(css);
    }

    /// Sends `keys` (WebDriver's key codes allowed, such as [`TAB`]) to
    /// whatever has the focus, as a keyboard would.
    pub async fn keys(&self, keys: &str) {
        let el = self
            .client
            .active_element()
            .await
            .expect("a focused element");
        el.send_keys(keys).await.expect("keys");
    }

    /// Presses Tab until `js` answers `true` of the focused element
    /// (`document.activeElement`), at most 80 times.
    pub async fn tab_to(&self, what: &str, js: &str) {
        let check = format!("const e = document.activeElement; return !!({js})");
        for _ in 0..80 {
            if self.js(&check).await == serde_json::Value::Bool(true) {
                return;
            }
            self.keys(TAB).await;
        }
        panic!("Tab never reached {what}");
    }

    /// The text of the element `css` finds.
    pub async fn text(&self, css: &str) -> String {
        let el = self.client.find(Locator::Css(css)).await.expect(css);
        el.text().await.expect(css)
    }

    /// Saves a screenshot as `target/ui-shots/NAME.png`.
    pub async fn shot(&self, name: &str) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-shots");
        std::fs::create_dir_all(&dir).unwrap();
        if let Ok(png) = self.client.screenshot().await {
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }

    /// Ends the session, then (on drop) chromedriver and its browser.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// WebDriver's key codes.
pub const TAB: &str = "\u{E004}";
/// Enter.
pub const ENTER: &str = "\u{E007}";
/// The down arrow.
pub const DOWN: &str = "\u{E015}";

/// Seconds from the console's "4.2 s", "350 ms" or "1 m 05 s"; `None` for
/// anything else ("finishing", "–").
pub fn seconds(text: &str) -> Option<f64> {
    let t = text.trim();
    if let Some(ms) = t.strip_suffix(" ms") {
        return ms.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    if let Some((m, s)) = t.split_once(" m ") {
        let s = s.strip_suffix(" s")?;
        return Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?);
    }
    t.strip_suffix(" s")?.parse().ok()
}
