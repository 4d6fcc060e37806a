//! TLS-terminating proxy for integration tests: the local RabbitMQ, MariaDB
//! and MongoDB servers speak plaintext only, so a test puts one of these in
//! front of a server, points BEDS at it, and then checks `handshakes()` to
//! prove the connection really was encrypted (and `failed_handshakes()` to
//! prove a plaintext client was turned away).
//!
//! Only the `ring` rustls provider is used, passed explicitly to every
//! config, so no process-wide default provider has to be installed.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Paths of the PEM files written by [`make_pki`].
#[allow(dead_code)] // not every test reads every path
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    pub server_cert_pem: PathBuf,
    pub server_key_pem: PathBuf,
    pub client_cert_pem: PathBuf,
    pub client_key_pem: PathBuf,
    /// Client certificate followed by its key in one file, as MongoDB's
    /// `tlsCertificateKeyFile` wants it.
    pub client_combined_pem: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1 and "localhost" (SANs), and a
/// client certificate, written as PEM files into `dir` (key files mode 0600).
pub fn make_pki(dir: &Path) -> Pki {
    fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "BEDS test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = Issuer::new(ca_params, ca_key);

    // Leaf certificate signed by the CA; webpki insists on the right EKU.
    let leaf = |cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![eku];
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let (server_cert, server_key) = leaf("localhost", sans, ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf(
        "beds-test-client",
        vec![],
        ExtendedKeyUsagePurpose::ClientAuth,
    );

    let pki = Pki {
        dir: dir.to_path_buf(),
        ca_pem: dir.join("ca.pem"),
        server_cert_pem: dir.join("server.pem"),
        server_key_pem: dir.join("server.key"),
        client_cert_pem: dir.join("client.pem"),
        client_key_pem: dir.join("client.key"),
        client_combined_pem: dir.join("client-combined.pem"),
    };
    let write = |path: &Path, text: &str, mode: u32| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    write(&pki.ca_pem, &ca_cert.pem(), 0o644);
    write(&pki.server_cert_pem, &server_cert, 0o644);
    write(&pki.server_key_pem, &server_key, 0o600);
    write(&pki.client_cert_pem, &client_cert, 0o644);
    write(&pki.client_key_pem, &client_key, 0o600);
    write(
        &pki.client_combined_pem,
        &format!("{client_cert}{client_key}"),
        0o600,
    );
    pki
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// TLS from the first byte (AMQPS, MongoDB).
    Plain,
    /// MySQL/MariaDB: TLS is negotiated inside the protocol (SSLRequest).
    Mysql,
}

pub struct TlsProxy {
    pub port: u16,
    handshakes: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TlsProxy {
    /// Listens on 127.0.0.1:0 with TLS (server cert from `pki`); each accepted
    /// connection is forwarded to `upstream` (plaintext).
    /// `require_client_cert`: verify client certs against the CA (mutual TLS).
    pub async fn start(
        pki: &Pki,
        upstream: &str,
        mode: Mode,
        require_client_cert: bool,
    ) -> TlsProxy {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(pki, require_client_cert)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (ok, bad, upstream) = (handshakes.clone(), failed.clone(), upstream.to_string());
        let task = tokio::spawn(async move {
            // The connections live in this set, so aborting the listener task
            // (on drop) cuts them too: a test can "take the server away".
            let mut conns = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                while conns.try_join_next().is_some() {}
                let (acceptor, upstream, ok, bad) =
                    (acceptor.clone(), upstream.clone(), ok.clone(), bad.clone());
                conns.spawn(async move {
                    let _ = client.set_nodelay(true);
                    let res = match mode {
                        Mode::Plain => relay_plain(client, &acceptor, &upstream, &ok).await,
                        Mode::Mysql => relay_mysql(client, &acceptor, &upstream, &ok).await,
                    };
                    if let Err(Stage::Handshake) = res {
                        bad.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        TlsProxy {
            port,
            handshakes,
            failed,
            task,
        }
    }

    /// How many connections completed a TLS handshake.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// How many TCP connections arrived that failed the TLS handshake (e.g. a
    /// plaintext client). Counted when the proxy notices, which can be a
    /// moment after the client has seen its error: poll briefly.
    pub fn failed_handshakes(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn server_config(pki: &Pki, require_client_cert: bool) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server_cert_pem)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&pki.server_key_pem).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&pki.ca_pem).unwrap() {
            roots.add(ca.unwrap()).unwrap();
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    builder.with_single_cert(certs, key).unwrap()
}

/// Where a connection ended early: only `Handshake` counts as a failed handshake.
enum Stage {
    Handshake,
    Relay,
}

async fn relay_plain(
    client: TcpStream,
    acceptor: &TlsAcceptor,
    upstream: &str,
    ok: &AtomicUsize,
) -> Result<(), Stage> {
    let mut tls = acceptor
        .accept(client)
        .await
        .map_err(|_| Stage::Handshake)?;
    ok.fetch_add(1, Ordering::SeqCst);
    let mut up = TcpStream::connect(upstream)
        .await
        .map_err(|_| Stage::Relay)?;
    let _ = up.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut tls, &mut up)
        .await
        .map_err(|_| Stage::Relay)?;
    Ok(())
}

const CLIENT_SSL: u32 = 0x0800;

/// One MySQL packet: 4-byte header (3-byte little-endian length, sequence id) + payload.
async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut pkt = vec![0u8; 4];
    r.read_exact(&mut pkt).await?;
    let len = u32::from_le_bytes([pkt[0], pkt[1], pkt[2], 0]) as usize;
    pkt.resize(4 + len, 0);
    r.read_exact(&mut pkt[4..]).await?;
    Ok(pkt)
}

/// MySQL/MariaDB: the client only starts TLS if the server's greeting offers
/// CLIENT_SSL, so the proxy adds that bit, takes the TLS handshake itself and
/// gives upstream a plaintext login. Because upstream never sees the
/// SSLRequest packet (seq 1), its sequence ids during authentication are one
/// lower than the client's: the auth phase is relayed packet by packet with
/// the shift, and after upstream's OK/ERR (the next command restarts at seq 0)
/// the bytes are copied as they are.
async fn relay_mysql(
    mut client: TcpStream,
    acceptor: &TlsAcceptor,
    upstream: &str,
    ok: &AtomicUsize,
) -> Result<(), Stage> {
    let mut up = TcpStream::connect(upstream)
        .await
        .map_err(|_| Stage::Relay)?;
    let _ = up.set_nodelay(true);
    let mut greeting = read_packet(&mut up).await.map_err(|_| Stage::Relay)?;
    if greeting.get(4) != Some(&10) {
        // Not a v10 greeting but an ERR (e.g. too many connections): pass it on.
        let _ = client.write_all(&greeting).await;
        return Err(Stage::Relay);
    }
    // Lower capability bytes follow: protocol version, NUL-terminated server
    // version, 4-byte connection id, 8 bytes of scramble, 1 filler byte.
    let nul = greeting[5..]
        .iter()
        .position(|&b| b == 0)
        .ok_or(Stage::Relay)?;
    let caps_at = 5 + nul + 1 + 4 + 8 + 1;
    greeting[caps_at + 1] |= (CLIENT_SSL >> 8) as u8;
    client
        .write_all(&greeting)
        .await
        .map_err(|_| Stage::Relay)?;

    // A TLS client sends a bare 32-byte SSLRequest; anything else is a
    // plaintext login, which this proxy refuses.
    let ssl_request = read_packet(&mut client)
        .await
        .map_err(|_| Stage::Handshake)?;
    let caps = |p: &[u8]| u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
    if ssl_request.len() != 4 + 32 || caps(&ssl_request) & CLIENT_SSL == 0 {
        return Err(Stage::Handshake);
    }
    let tls = acceptor
        .accept(client)
        .await
        .map_err(|_| Stage::Handshake)?;
    ok.fetch_add(1, Ordering::SeqCst);

    let (mut cr, mut cw) = tokio::io::split(tls);
    let (mut ur, mut uw) = up.into_split();
    let mut response = read_packet(&mut cr).await.map_err(|_| Stage::Relay)?;
    let plain_caps = caps(&response) & !CLIENT_SSL;
    response[4..8].copy_from_slice(&plain_caps.to_le_bytes());
    response[3] = 1;
    uw.write_all(&response).await.map_err(|_| Stage::Relay)?;

    // Set before the final OK/ERR reaches the client, so the client's first
    // command (seq 0) is never shifted.
    let auth_done = Arc::new(AtomicBool::new(false));
    let done = auth_done.clone();
    let down = async move {
        loop {
            let mut pkt = read_packet(&mut ur).await?;
            pkt[3] = pkt[3].wrapping_add(1);
            let last = matches!(pkt.get(4), Some(0x00 | 0xFF));
            if last {
                done.store(true, Ordering::SeqCst);
            }
            cw.write_all(&pkt).await?;
            if last {
                break;
            }
        }
        tokio::io::copy(&mut ur, &mut cw).await?;
        cw.shutdown().await
    };
    let upward = async move {
        loop {
            let mut pkt = read_packet(&mut cr).await?;
            let shifted = !auth_done.load(Ordering::SeqCst);
            if shifted {
                pkt[3] = pkt[3].wrapping_sub(1);
            }
            uw.write_all(&pkt).await?;
            if !shifted {
                break;
            }
        }
        tokio::io::copy(&mut cr, &mut uw).await?;
        uw.shutdown().await
    };
    // Either side closing ends the connection (the other half is dropped).
    let res: std::io::Result<()> = tokio::select! { r = down => r, r = upward => r };
    res.map_err(|_| Stage::Relay)
}
