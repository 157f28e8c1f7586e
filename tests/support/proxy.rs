//! A TCP proxy in front of one node that cuts, black-holes or slows its links while a test runs,
//! chosen per source IP, so a test can partition or slow one node without root or namespaces.
//!
//! Each node listens on its own loopback address (`127.0.0.2`, `127.0.0.3`, ...) and talks to its
//! peers from that address; everybody reaches it through its proxy on `127.0.0.1`. The proxy sees
//! who connects (`127.0.0.1` = a client or the LB, `127.0.0.k` = a node) and applies that
//! source's [`Link`] to new connections and to the ones already open.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy does with the traffic of one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Relay bytes as they come.
    Open,
    /// Close new connections at once (after accepting them: a listener cannot refuse per source)
    /// and close the open ones: the peer sees a reset or an early EOF.
    Refuse,
    /// Accept new connections and relay nothing, and stop relaying on the open ones: the peer's
    /// requests hang until its own timeouts fire. Leaving this state closes those connections,
    /// as a real network would once the peers' timers gave up on them.
    Blackhole,
    /// Relay every chunk after this delay, in both directions (a round trip gains twice it).
    Delay(Duration),
}

/// The proxy of one node; stops (closing every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect: `127.0.0.1:<port>`.
    pub listen: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    default: Option<Link>,
    by_source: HashMap<IpAddr, Link>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
}

/// One relayed connection: clones of both sockets, so a rule change can close it.
#[derive(Debug)]
struct Conn {
    source: IpAddr,
    client: TcpStream,
    upstream: TcpStream,
    open_halves: u8,
}

impl Conn {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

impl State {
    fn link(&self, source: IpAddr) -> Link {
        self.by_source
            .get(&source)
            .copied()
            .or(self.default)
            .unwrap_or(Link::Open)
    }
}

/// How long a relay thread waits between looks at a black-holed link (it also wakes on changes).
const BLACKHOLE_RECHECK: Duration = Duration::from_millis(200);
/// How long connecting to the node may take before the client's connection is dropped.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Proxy {
    /// Listens on a free port of `127.0.0.1` and relays to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let listen = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let for_thread = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("proxy-{}", listen.port()))
            .spawn(move || accept_loop(&listener, &for_thread))
            .expect("start proxy thread");
        Proxy {
            listen,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// Sets the link of one source address.
    pub fn set(&self, source: IpAddr, link: Link) {
        self.change(|state| {
            state.by_source.insert(source, link);
        });
    }

    /// Sets the link of every source without a rule of its own.
    pub fn set_default(&self, link: Link) {
        self.change(|state| state.default = Some(link));
    }

    /// Removes every rule: all links open.
    pub fn heal(&self) {
        self.change(|state| {
            state.by_source.clear();
            state.default = None;
        });
    }

    /// Connections accepted and connections closed by a `Refuse` rule, so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.accepted.load(Ordering::Relaxed),
            self.shared.refused.load(Ordering::Relaxed),
        )
    }

    /// Applies `edit` to the rules, then closes the open connections that the change cuts.
    fn change(&self, edit: impl FnOnce(&mut State)) {
        let mut state = self.shared.lock();
        let before: HashMap<u64, Link> = state
            .conns
            .iter()
            .map(|(id, c)| (*id, state.link(c.source)))
            .collect();
        edit(&mut state);
        let cut: Vec<u64> = before
            .into_iter()
            .filter(|(id, old)| {
                let new = state
                    .conns
                    .get(id)
                    .map_or(Link::Open, |c| state.link(c.source));
                new == Link::Refuse || (*old == Link::Blackhole && new != Link::Blackhole)
            })
            .map(|(id, _)| id)
            .collect();
        for id in cut {
            if let Some(conn) = state.conns.remove(&id) {
                conn.close();
            }
        }
        self.shared.changed.notify_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.listen, Duration::from_secs(1));
        {
            let mut state = self.shared.lock();
            for (_, conn) in state.conns.drain() {
                conn.close();
            }
        }
        self.shared.changed.notify_all();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks while the connection's link is black-holed; `Some(delay)` to relay, `None` to stop.
    fn gate(&self, id: u64) -> Option<Duration> {
        let mut state = self.lock();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let source = state.conns.get(&id)?.source;
            match state.link(source) {
                Link::Open => return Some(Duration::ZERO),
                Link::Delay(d) => return Some(d),
                Link::Refuse => return None,
                Link::Blackhole => {
                    state = self
                        .changed
                        .wait_timeout(state, BLACKHOLE_RECHECK)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    /// One direction of a connection ended; forget the connection once both have.
    fn half_done(&self, id: u64) {
        let mut state = self.lock();
        let finished = state.conns.get_mut(&id).is_some_and(|c| {
            c.open_halves -= 1;
            c.open_halves == 0
        });
        if finished {
            if let Some(conn) = state.conns.remove(&id) {
                conn.close();
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(peer) = client.peer_addr() else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.lock().link(peer.ip()) == Link::Refuse {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        // A dead node: drop the client's connection (it sees an early EOF, not a refusal).
        let Ok(upstream) = TcpStream::connect_timeout(&shared.target, UPSTREAM_CONNECT_TIMEOUT)
        else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        relay(shared, peer.ip(), client, upstream);
    }
}

/// Registers the connection and starts one thread per direction.
fn relay(shared: &Arc<Shared>, source: IpAddr, client: TcpStream, upstream: TcpStream) {
    let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = (
        client.try_clone(),
        upstream.try_clone(),
        client.try_clone(),
        upstream.try_clone(),
    ) else {
        return;
    };
    let id = {
        let mut state = shared.lock();
        state.next_id += 1;
        let id = state.next_id;
        state.conns.insert(
            id,
            Conn {
                source,
                client: c3,
                upstream: u3,
                open_halves: 2,
            },
        );
        id
    };
    for (from, to) in [(client, u2), (upstream, c2)] {
        let for_thread = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("proxy-pump".into())
            .spawn(move || pump(&for_thread, id, from, to));
        if spawned.is_err() {
            shared.half_done(id);
        }
    }
}

/// Copies one direction until EOF, an error, or the link is cut; then half-closes the other side.
fn pump(shared: &Shared, id: u64, mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match shared.gate(id) {
            None => break,
            Some(delay) if !delay.is_zero() => std::thread::sleep(delay),
            Some(_) => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    shared.half_done(id);
}
