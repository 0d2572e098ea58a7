//! `scripts/testenv up` / `down` on a second, private environment (its own folder, so its
//! own ports): `down` must leave no process and no listening port of its own behind, and
//! must not touch another environment on the same machine.

mod support;

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use support::*;

fn alive(pid: u32) -> bool {
    // A zombie has exited; it only waits to be reaped by whoever adopted it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

fn read_pids(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir.join("pids")).expect("pids folder") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pid = std::fs::read_to_string(&path)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        out.push((name, pid));
    }
    out.sort();
    out
}

fn read_ports(dir: &Path) -> Vec<(String, u16)> {
    let text = std::fs::read_to_string(dir.join("state")).expect("state file");
    parse_env_lines(&text)
        .into_iter()
        .map(|(k, v)| {
            let port = v.parse().unwrap_or_else(|e| panic!("{k}={v}: {e}"));
            (k, port)
        })
        .collect()
}

#[tokio::test]
async fn second_environment_up_then_down_leaves_nothing_behind() {
    // The shared environment must be up too: the second one must not collide with it,
    // and its `down` must not touch it.
    let Some(main_env) = testenv() else { return };
    let tmp = tempfile::Builder::new()
        .prefix("kscale-testenv-")
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path().join("env");
    let dir_str = dir.to_string_lossy().into_owned();
    let vars = [("KSCALE_TESTENV_DIR", dir_str.as_str())];

    let up = run_testenv_script(&["up"], &vars);
    if let Err(e) = &up {
        let _ = run_testenv_script(&["down"], &vars);
        panic!("{e}");
    }
    let env =
        read_env_file(&repo_root(), &dir.join("env")).expect("env file of second environment");
    // `env` prints the same lines; `up` again reuses the running environment.
    let printed = run_testenv_script(&["env"], &vars).expect("testenv env");
    assert_eq!(
        printed,
        std::fs::read_to_string(dir.join("env")).expect("env file")
    );
    let again = run_testenv_script(&["up"], &vars).expect("second up");
    assert_eq!(
        again, printed,
        "second `up` must reuse the running environment"
    );

    let client = env.client().await;
    let version = client
        .apiserver_version()
        .await
        .expect("second apiserver /version");
    assert_eq!(version.git_version, pinned_k8s_version());

    let pids = read_pids(&dir);
    let ports = read_ports(&dir);
    assert_eq!(pids.len(), 7, "expected 7 processes, got {pids:?}");
    for (name, pid) in &pids {
        assert!(alive(*pid), "{name} (pid {pid}) is not running after up");
    }
    let main_ports = read_ports(&main_env.dir);
    for (name, port) in &ports {
        assert!(
            !main_ports.iter().any(|(_, p)| p == port),
            "{name}={port} collides with the shared environment's ports {main_ports:?}"
        );
    }
    for name in [
        "APISERVER_PORT",
        "ETCD_PORT",
        "PROMETHEUS_PORT",
        "KWOK_PORT",
        "METRICS_SERVER_PORT",
    ] {
        let port = ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .expect(name);
        assert!(listening(port), "{name} {port} is not listening after up");
    }

    run_testenv_script(&["down"], &vars).expect("testenv down");

    let still: Vec<_> = pids.iter().filter(|(_, pid)| alive(*pid)).collect();
    assert!(
        still.is_empty(),
        "processes still running after down: {still:?}"
    );
    let open: Vec<_> = ports.iter().filter(|(_, port)| listening(*port)).collect();
    assert!(
        open.is_empty(),
        "ports still listening after down: {open:?}"
    );
    assert!(
        run_testenv_script(&["status"], &vars).is_err(),
        "status must report a stopped environment"
    );
    assert!(
        !dir.join("env").exists(),
        "env file must be removed by down"
    );

    // The shared environment is untouched.
    let main_client = main_env.client().await;
    main_client
        .apiserver_version()
        .await
        .expect("shared environment still answers after the second one's down");
}
