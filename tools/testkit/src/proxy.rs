//! A TCP proxy in front of the broker (or the apiserver) that a test can cut and restore: a
//! real network failure for one worker, without disturbing the servers other tests share. It
//! counts what the server sent, so a test can see how much a worker read.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};

/// A running proxy.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    from_target: Arc<AtomicU64>,
}

/// Copies until either side closes, counting the bytes into `counted`.
async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, counted: &AtomicU64) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        counted.fetch_add(n as u64, Ordering::SeqCst);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    /// Proxies 127.0.0.1:<port> to `target` (host:port).
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let from_target = Arc::new(AtomicU64::new(0));
        let (up2, cut2, counter) = (up.clone(), cut.clone(), from_target.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !up2.load(Ordering::SeqCst) {
                    drop(client); // refused while "down"
                    continue;
                }
                let (target, counter) = (target.clone(), counter.clone());
                let mut cut_rx = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&target).await else { return };
                    let ((client_in, client_out), (server_in, server_out)) = (client.split(), server.into_split());
                    let sent = AtomicU64::new(0);
                    tokio::select! {
                        _ = async {
                            tokio::join!(pump(client_in, server_out, &sent), pump(server_in, client_out, &counter))
                        } => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy { port, up, cut, from_target }
    }

    /// Bytes the target has sent to the proxy's clients so far.
    pub fn bytes_from_target(&self) -> u64 {
        self.from_target.load(Ordering::SeqCst)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// An AMQP URL through this proxy, from the real one.
    pub fn url(&self, real: &str) -> String {
        let (scheme, rest) = real.split_once("://").unwrap();
        let (auth, rest) = rest.split_once('@').map(|(a, r)| (format!("{a}@"), r)).unwrap_or((String::new(), rest));
        let vhost = rest.split_once('/').map(|(_, v)| format!("/{v}")).unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}{vhost}", self.port)
    }
}

/// host:port of an AMQP URL.
pub fn target(real: &str) -> String {
    let rest = real.split_once("://").unwrap().1;
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    let hostport = rest.split('/').next().unwrap();
    if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5672")
    }
}
