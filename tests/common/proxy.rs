//! A TCP proxy with a cut/heal switch, for cutting a node off its servers (tests/chaos.rs)
//! or a leaf server off its hub (tests/edge.rs, benches/edge.rs). A cut shuts down every
//! open connection at once (both directions, like a dead link) and refuses new ones until
//! healed. Plain threads, so it runs under any test runtime, or none.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    cut: AtomicBool,
    /// Set on drop: the accept loop ends.
    closed: AtomicBool,
    /// Both sides of every open connection, to shut them down on a cut.
    open: Mutex<Vec<TcpStream>>,
}

impl State {
    fn shut_all(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Listens on a loopback port and forwards each connection to `upstream`, unless cut.
/// Dropping it stops listening and shuts every connection.
pub struct Proxy {
    port: u16,
    state: Arc<State>,
}

impl Proxy {
    /// Forwards a free loopback port to `127.0.0.1:<upstream>`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a proxy port");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let st = state.clone();
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
        std::thread::spawn(move || accept_loop(listener, upstream, st));
        Proxy { port, state }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A NATS URL through it.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Shuts every open connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.shut_all();
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so it sees `closed`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, st: Arc<State>) {
    for client in listener.incoming() {
        if st.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if st.cut.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue; // refused: dropped at once
        }
        let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(1)) else {
            continue; // the server is down: the client sees a closed connection
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut open = st.open.lock().unwrap();
            open.retain(|s| s.peer_addr().is_ok());
            open.push(client.try_clone().unwrap());
            open.push(server.try_clone().unwrap());
        }
        // A cut between the check above and the push must still catch this connection.
        if st.cut.load(Ordering::SeqCst) {
            st.shut_all();
            continue;
        }
        for (mut from, mut to) in [
            (client.try_clone().unwrap(), server.try_clone().unwrap()),
            (server, client),
        ] {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
            });
        }
    }
}
