//! The kubelet's container-log endpoint (`/containerLogs/{ns}/{pod}/{container}`) over TLS,
//! which the apiserver calls for `GET .../pods/NAME/log`.

use std::{path::PathBuf, sync::Arc};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::Sim;

/// Where the log of one container is written.
pub fn log_path(sim: &Sim, namespace: &str, pod: &str, container: &str) -> PathBuf {
    sim.args.work_dir.join("logs").join(namespace).join(pod).join(format!("{container}.log"))
}

/// Serves container logs until the process exits.
pub async fn serve(sim: Arc<Sim>) {
    if let Err(err) = serve_inner(sim).await {
        tracing::error!(%err, "kubelet log server stopped");
    }
}

async fn serve_inner(sim: Arc<Sim>) -> anyhow::Result<()> {
    let certs = CertificateDer::pem_file_iter(&sim.args.tls_cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&sim.args.tls_key)?;
    let config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(("127.0.0.1", sim.args.port)).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let sim = sim.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let request = String::from_utf8_lossy(&head);
            let target = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = respond(&sim, target).await;
            let header = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(header.as_bytes()).await;
            let _ = tls.write_all(&body).await;
            let _ = tls.shutdown().await;
        });
    }
}

async fn respond(sim: &Sim, target: &str) -> (&'static str, Vec<u8>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["containerLogs", ns, pod, container] = parts.as_slice() else {
        return ("404 Not Found", b"sim-node serves only /containerLogs\n".to_vec());
    };
    if [ns, pod, container].iter().any(|p| p.contains("..") || p.is_empty()) {
        return ("400 Bad Request", b"bad path\n".to_vec());
    }
    let Ok(content) = tokio::fs::read(log_path(sim, ns, pod, container)).await else {
        return ("404 Not Found", format!("no log for {ns}/{pod}/{container}\n").into_bytes());
    };
    let param =
        |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse::<usize>().ok());
    ("200 OK", select(content, param("tailLines"), param("limitBytes")))
}

/// Applies the kubelet's `tailLines` (last N lines) and then `limitBytes` (first N bytes).
pub fn select(content: Vec<u8>, tail_lines: Option<usize>, limit_bytes: Option<usize>) -> Vec<u8> {
    let mut out = content;
    if let Some(n) = tail_lines {
        let body = out.strip_suffix(b"\n").unwrap_or(&out);
        let start =
            body.iter().enumerate().rev().filter(|(_, b)| **b == b'\n').nth(n.saturating_sub(1)).map(|(i, _)| i + 1);
        out = match (n, start) {
            (0, _) => Vec::new(),
            (_, Some(start)) => out[start..].to_vec(),
            (_, None) => out,
        };
    }
    if let Some(limit) = limit_bytes {
        out.truncate(limit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::select;

    #[test]
    fn tail_and_limit() {
        let log = b"a\nb\nc\n".to_vec();
        assert_eq!(select(log.clone(), Some(2), None), b"b\nc\n");
        assert_eq!(select(log.clone(), Some(10), None), b"a\nb\nc\n");
        assert_eq!(select(log.clone(), Some(0), None), b"");
        assert_eq!(select(log.clone(), None, Some(3)), b"a\nb");
        assert_eq!(select(b"no newline".to_vec(), Some(1), None), b"no newline");
    }
}
