//! The bench's TLS proxy baselines: what a user would put between two pods
//! instead of a mesh. A pair is a client-side proxy in the client pod,
//! listening on loopback, and a server-side proxy in the server pod that
//! terminates mutual TLS 1.3 (P-256 certificates from one CA, verified both
//! ways) and forwards to the server on loopback; one TLS connection per
//! application connection. A pair carries several services, each a port of
//! the server pod, on ports of its own ([`Baseline::local_port`]).

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    Cluster, PodId, Proc,
    apps::{ensure_installed, wait_listening},
};

const STUNNEL: &str = "/usr/bin/stunnel4";
const HAPROXY: &str = "/usr/sbin/haproxy";
/// HAProxy's threads per process: one per core of the bench machine (2).
const HAPROXY_THREADS: usize = 2;
/// Connections per HAProxy: well above the idle scenario's 1000, and few
/// enough that the descriptors HAProxy reserves for them (two each) fit a
/// hard `ulimit -n` of 20000, as on the bench machines (it refuses to start
/// otherwise).
const HAPROXY_MAXCONN: usize = 4000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// `stunnel4`: one process, one thread.
    Stunnel,
    /// `haproxy` in `mode tcp`, multi-threaded, resuming TLS sessions
    /// towards the server side.
    Haproxy,
}

impl Baseline {
    /// The setup's name in the bench's tables.
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Stunnel => "stunnel",
            Baseline::Haproxy => "haproxy",
        }
    }

    /// Where the server-side proxy of a pair listens for TLS for the
    /// `service`-th service.
    fn tls_port(self, service: usize) -> u16 {
        let base = match self {
            Baseline::Stunnel => 7443,
            Baseline::Haproxy => 8443,
        };
        base + service as u16
    }

    /// Where the client-side proxy of `pair` listens on loopback for the
    /// `service`-th service.
    pub fn local_port(self, pair: usize, service: usize) -> u16 {
        let base = match self {
            Baseline::Stunnel => 7100,
            Baseline::Haproxy => 7200,
        };
        base + 10 * pair as u16 + service as u16
    }

    /// What the client connects to for the `service`-th service of `pair`.
    pub fn local_addr(self, pair: usize, service: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.local_port(pair, service)))
    }

    /// Starts the pair `pair` between `client` and `server` carrying
    /// `services` (ports the server pod listens on), once every port of
    /// both sides listens: `[client side, server side]`.
    pub fn start(
        self,
        cluster: &mut Cluster,
        client: PodId,
        server: PodId,
        pair: usize,
        services: &[u16],
    ) -> anyhow::Result<[Proc; 2]> {
        let (binary, package) = match self {
            Baseline::Stunnel => (STUNNEL, "stunnel4"),
            Baseline::Haproxy => (HAPROXY, "haproxy"),
        };
        ensure_installed(binary, package)?;
        let dir = cluster.tempdir().join(format!("{package}-{pair}"));
        fs::create_dir_all(&dir)?;
        make_certificates(&dir)?;
        let server_ip = cluster.pod(server).ipv4;
        let tls = |service: usize| SocketAddr::from((server_ip, self.tls_port(service)));
        let local = |service: usize| self.local_port(pair, service);
        let [client_args, server_args] = match self {
            Baseline::Stunnel => stunnel_configs(&dir, services, tls, local)?,
            Baseline::Haproxy => haproxy_configs(&dir, services, tls, local)?,
        };
        let binary = PathBuf::from(binary);
        let server_proc = cluster.spawn(server, &binary, &server_args)?;
        let client_proc = cluster.spawn(client, &binary, &client_args)?;
        for service in 0..services.len() {
            for (pod, port, proc) in [
                (server, self.tls_port(service), &server_proc),
                (client, local(service), &client_proc),
            ] {
                wait_listening(cluster, pod, port)
                    .with_context(|| format!("{}: {}", proc.label(), proc.stderr_tail()))?;
            }
        }
        Ok([client_proc, server_proc])
    }
}

/// stunnel's configurations (one section per service) and arguments,
/// client side then server side.
fn stunnel_configs(
    dir: &Path,
    services: &[u16],
    tls: impl Fn(usize) -> SocketAddr,
    local: impl Fn(usize) -> u16,
) -> anyhow::Result<[Vec<String>; 2]> {
    let d = dir.display();
    let mut out = Vec::new();
    for side in ["client", "server"] {
        let mut config = "foreground = yes\npid =\ndebug = 3\n\
                          socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
            .to_owned();
        for (service, &port) in services.iter().enumerate() {
            let (accept, connect) = if side == "client" {
                (
                    format!("127.0.0.1:{}", local(service)),
                    tls(service).to_string(),
                )
            } else {
                (
                    format!("0.0.0.0:{}", tls(service).port()),
                    format!("127.0.0.1:{port}"),
                )
            };
            config.push_str(&format!(
                "[service-{service}]\nclient = {}\naccept = {accept}\nconnect = {connect}\n\
                 cert = {d}/{side}.crt\nkey = {d}/{side}.key\nCAfile = {d}/ca.crt\n\
                 verifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\n",
                if side == "client" { "yes" } else { "no" }
            ));
        }
        let path = dir.join(format!("{side}.conf"));
        fs::write(&path, config)?;
        out.push(vec![path.to_string_lossy().into_owned()]);
    }
    Ok([out.remove(0), out.remove(0)])
}

/// HAProxy's configurations (a frontend and a backend per service) and
/// arguments, client side then server side, each checked by `haproxy -c`.
///
/// `mode tcp` ties each client connection to one server connection (idle
/// connection reuse, `http-reuse`, is for HTTP only), so the keep-alive
/// HAProxy allows towards the server is TLS session resumption, which
/// `server ... ssl` does by default. TCP_NODELAY needs no option: "HAProxy
/// automatically disables Nagle in pure TCP mode and in tunnels"
/// (`/usr/share/doc/haproxy/management.txt`; strace shows it set on the
/// accepted and the outgoing socket of each connection).
fn haproxy_configs(
    dir: &Path,
    services: &[u16],
    tls: impl Fn(usize) -> SocketAddr,
    local: impl Fn(usize) -> u16,
) -> anyhow::Result<[Vec<String>; 2]> {
    // HAProxy's `crt` is one PEM file: the certificate, then its key.
    for side in ["client", "server"] {
        let mut pem = fs::read_to_string(dir.join(format!("{side}.crt")))?;
        pem.push_str(&fs::read_to_string(dir.join(format!("{side}.key")))?);
        fs::write(dir.join(format!("{side}.pem")), pem)?;
    }
    let d = dir.display();
    // Long timeouts: the idle scenario's connections stay open, unused.
    let common = format!(
        "global\n    nbthread {HAPROXY_THREADS}\n    maxconn {HAPROXY_MAXCONN}\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    \
         timeout server 1h\n\n"
    );
    let (mut client, mut server) = (common.clone(), common);
    for (service, &port) in services.iter().enumerate() {
        // The server's certificate is checked against the CA and its name.
        client.push_str(&format!(
            "frontend service-{service}\n    bind 127.0.0.1:{}\n    default_backend tls-{service}\n\n\
             backend tls-{service}\n    server tls {} ssl verify required \
             ca-file {d}/ca.crt verifyhost server crt {d}/client.pem ssl-min-ver TLSv1.3\n\n",
            local(service),
            tls(service)
        ));
        server.push_str(&format!(
            "frontend service-{service}\n    bind 0.0.0.0:{} ssl crt {d}/server.pem \
             ca-file {d}/ca.crt verify required ssl-min-ver TLSv1.3\n    \
             default_backend plain-{service}\n\n\
             backend plain-{service}\n    server plain 127.0.0.1:{port}\n\n",
            tls(service).port()
        ));
    }
    let mut out = Vec::new();
    for (side, config) in [("client", client), ("server", server)] {
        let path = dir.join(format!("{side}.cfg"));
        fs::write(&path, config)?;
        // A bad configuration says why here, not as a port that never opens.
        let check = Command::new(HAPROXY)
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .output()
            .with_context(|| format!("cannot run {HAPROXY}"))?;
        ensure!(
            check.status.success(),
            "{HAPROXY} rejects {}: {}",
            path.display(),
            String::from_utf8_lossy(&check.stderr).trim()
        );
        // `-db`: in the foreground, one process (no master, no daemon), so
        // the cluster's handle is HAProxy itself.
        let path = path.to_string_lossy().into_owned();
        out.push(vec!["-db".to_owned(), "-f".to_owned(), path]);
    }
    Ok([out.remove(0), out.remove(0)])
}

/// Certificates like Ferry's in `dir`: a CA (`ca.crt`) and P-256 leaves
/// under it, `client.crt`/`.key` and `server.crt`/`.key` (CN `client` and
/// `server`).
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        if !output.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    };
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let days = ["-days", "1"];
    openssl(
        &[
            &["req", "-x509"][..],
            &p256,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                "/CN=bench-ca",
            ],
            &days,
        ]
        .concat(),
    )?;
    for side in ["client", "server"] {
        let (key, csr, crt) = (
            format!("{side}.key"),
            format!("{side}.csr"),
            format!("{side}.crt"),
        );
        let subject = format!("/CN={side}");
        openssl(
            &[
                &["req"][..],
                &p256,
                &["-keyout", &key, "-out", &csr, "-subj", &subject],
            ]
            .concat(),
        )?;
        openssl(
            &[
                &[
                    "x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key",
                ][..],
                &["-CAcreateserial", "-out", &crt],
                &days,
            ]
            .concat(),
        )?;
    }
    Ok(())
}
