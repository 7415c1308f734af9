//! A TCP proxy between a source and a receiver that breaks chosen
//! connections on demand: reset (RST on both sides) or silence (stop
//! forwarding, sockets left open), for failover and hand-off tests.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One proxied connection.
pub struct Link {
    client: TcpStream,
    upstream: TcpStream,
    silent: Arc<AtomicBool>,
}

/// A proxy listening on loopback that forwards to `upstream`.
pub struct Proxy {
    /// The address sources connect to.
    pub addr: String,
    links: Arc<Mutex<Vec<Link>>>,
    refuse: Arc<AtomicBool>,
}

/// Closes a socket with an RST (SO_LINGER 0) rather than a FIN.
fn reset(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket we own, with a correctly sized
    // linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = s.shutdown(Shutdown::Both);
}

fn pump(mut from: TcpStream, mut to: TcpStream, silent: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while silent.load(Ordering::Relaxed) {
            // A silent link swallows nothing more: the bytes wait, and so
            // does the sender once the socket buffers fill.
            std::thread::sleep(Duration::from_millis(20));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Proxy {
    /// Starts forwarding to `upstream` (host:port).
    pub fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let refuse = Arc::new(AtomicBool::new(false));
        let (up, l2, r2) = (upstream.to_string(), links.clone(), refuse.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if r2.load(Ordering::Relaxed) {
                    reset(&client);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(&up) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let silent = Arc::new(AtomicBool::new(false));
                let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let (c3, u3) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let (s1, s2) = (silent.clone(), silent.clone());
                std::thread::spawn(move || pump(c2, u2, s1));
                std::thread::spawn(move || pump(u3, c3, s2));
                l2.lock().unwrap().push(Link {
                    client,
                    upstream,
                    silent,
                });
            }
        });
        Self {
            addr,
            links,
            refuse,
        }
    }

    /// Resets every new connection from now on (the far side is gone).
    pub fn refuse_new(&self) {
        self.refuse.store(true, Ordering::Relaxed);
    }

    /// Connections made so far.
    pub fn connections(&self) -> usize {
        self.links.lock().unwrap().len()
    }

    /// Resets connection `i` (in the order they were made) on both sides.
    pub fn reset(&self, i: usize) {
        let links = self.links.lock().unwrap();
        reset(&links[i].client);
        reset(&links[i].upstream);
    }

    /// Resets every connection made so far.
    pub fn reset_all(&self) {
        for l in self.links.lock().unwrap().iter() {
            reset(&l.client);
            reset(&l.upstream);
        }
    }

    /// Stops forwarding on connection `i`, both ways, leaving it open.
    pub fn silence(&self, i: usize) {
        self.links.lock().unwrap()[i]
            .silent
            .store(true, Ordering::Relaxed);
    }

    /// Stops forwarding on every connection made so far.
    pub fn silence_all(&self) {
        for l in self.links.lock().unwrap().iter() {
            l.silent.store(true, Ordering::Relaxed);
        }
    }
}
