//! A TCP proxy in front of the broker that a test can cut and restore: a real network
//! failure for one worker, without disturbing the broker other tests share.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio::{net::TcpListener, sync::watch};

/// A running proxy.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    /// Proxies 127.0.0.1:<port> to `target` (host:port).
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let (up2, cut2) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !up2.load(Ordering::SeqCst) {
                    drop(client); // refused while "down"
                    continue;
                }
                let target = target.clone();
                let mut cut_rx = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy { port, up, cut }
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
