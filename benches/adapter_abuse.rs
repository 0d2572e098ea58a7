//! The external metrics adapter under abuse (issue 13): `kscale run` as a child process,
//! registered as `v1beta1.external.metrics.k8s.io` in the test environment's kube-apiserver, then
//! 1. `ADAPTER_ABUSE_PATHS` (default 5,000) authenticated requests (front-proxy certificate,
//!    user in `system:masters`, so each is authorized) with distinct 60 KB paths, 16 at a time;
//! 2. `ADAPTER_ABUSE_IDLE` (default 1,000) idle TLS connections (handshake done, no request);
//! 3. while they are held, a legitimate request through kube-apiserver (`kubectl get --raw`).
//!
//! Prints the daemon's resident memory (VmRSS, and its peak VmHWM) after each step, the answers'
//! status codes, and how many idle connections the daemon kept. `KSCALE_BIN` runs another build
//! of the daemon (an older one, to compare); it is only given flags every version has.
//!
//! `cargo bench --bench adapter_abuse` (starts `scripts/testenv` if needed). No assertion:
//! figures live here, behaviour is checked in `tests/isolation_e2e/adapter.rs`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio::io::AsyncReadExt as _;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// VmRSS and VmHWM of `pid`, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn print_memory(step: &str, pid: u32) {
    let (rss, hwm) = memory(pid);
    println!("{step:<44} RSS {rss:>8.1} MiB   peak {hwm:>8.1} MiB");
}

fn main() {
    let Some(env) = support::testenv() else {
        return;
    };
    let paths: usize = env_or("ADAPTER_ABUSE_PATHS", 5000);
    let idle_n: usize = env_or("ADAPTER_ABUSE_IDLE", 1000);
    let bin = std::env::var("KSCALE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kscale").into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = env.client().await;
        let ns = support::create_namespace(env, &client, "adapter-abuse").await;
        let dir = std::env::temp_dir().join(format!("kscale-adapter-abuse-{}", std::process::id()));
        let ca_pem = support::write_adapter_certificate(&dir, &ns.name);
        let port = support::free_port();
        let log = dir.join("daemon.log");
        let child = Command::new(&bin)
            .args(["run", "--metrics-addr", &format!("127.0.0.1:{}", support::free_port())])
            .args(["--watch-namespace", &ns.name, "--leader-election-namespace", &ns.name])
            .args(["--external-metrics-addr", &format!("127.0.0.1:{port}")])
            .arg("--external-metrics-tls-cert-file")
            .arg(dir.join("tls.crt"))
            .arg("--external-metrics-tls-key-file")
            .arg(dir.join("tls.key"))
            .env("KUBECONFIG", &env.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("kscale run starts");
        let pid = child.id();
        let _daemon = support::ChildGuard(child);
        let _apiservice =
            support::register_external_metrics(env, &client, &ns.name, port, &ca_pem, &log).await;
        let legit = "/apis/external.metrics.k8s.io/v1beta1";
        support::wait_until("the APIService answers", Duration::from_secs(90), || async {
            match support::raw_get(&client, legit).await {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        println!("daemon {bin} (pid {pid}), adapter on 127.0.0.1:{port}");
        print_memory("started, registered", pid);

        // 1. Distinct 60 KB paths, authenticated and authorized.
        let pki = env.dir.join("pki");
        let read = |f: &str| std::fs::read_to_string(pki.join(f)).expect("testenv PKI");
        let proxy = support::tls_client_config(
            &ca_pem,
            Some((&read("front-proxy-client.crt"), &read("front-proxy-client.key"))),
        );
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let start = Instant::now();
        let codes: BTreeMap<String, usize> = futures::stream::iter(0..paths)
            .map(|i| {
                let proxy = proxy.clone();
                let ns = ns.name.clone();
                async move {
                    let path = format!(
                        "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/m{i}-{}",
                        "a".repeat(60 * 1024)
                    );
                    let headers = [("X-Remote-User", "abuser"), ("X-Remote-Group", "system:masters")];
                    match support::https_get(proxy, addr, &path, &headers).await {
                        Ok((code, _)) => code.to_string(),
                        Err(e) => format!("error ({})", e.chars().take(40).collect::<String>()),
                    }
                }
            })
            .buffer_unordered(16)
            .fold(BTreeMap::new(), |mut m, code| async move {
                *m.entry(code).or_insert(0) += 1;
                m
            })
            .await;
        println!("{paths} distinct 60 KB paths in {:.1} s: {codes:?}", start.elapsed().as_secs_f64());
        print_memory("after the 60 KB paths", pid);

        // 2. Idle TLS connections.
        let plain = support::tls_client_config(&ca_pem, None);
        let mut idle = Vec::new();
        let mut failed = 0;
        for _ in 0..idle_n {
            let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                failed += 1;
                continue;
            };
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            match tokio_rustls::TlsConnector::from(Arc::clone(&plain)).connect(name, tcp).await {
                Ok(tls) => idle.push(tls),
                Err(_) => failed += 1,
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut open = 0;
        for tls in &mut idle {
            let mut b = [0u8; 1];
            if tokio::time::timeout(Duration::from_millis(5), tls.read(&mut b)).await.is_err() {
                open += 1;
            }
        }
        println!("{idle_n} idle TLS connections: {} completed the handshake ({failed} failed), {open} still open", idle.len());
        print_memory("with the idle connections held", pid);

        // 3. A legitimate request through kube-apiserver, while they are held.
        let start = Instant::now();
        let (code, body) = support::raw_get(&client, legit).await;
        println!(
            "legitimate GET {legit} through kube-apiserver: {code} in {:.0} ms{}",
            start.elapsed().as_secs_f64() * 1000.0,
            if code == 200 { String::new() } else { format!(": {body:.200}") }
        );
        print_memory("end", pid);
        drop(idle);
    });
}
