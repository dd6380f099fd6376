//! The binary's edges: --check-config, config errors naming the key, env overrides.

mod common;

use common::{cachefront_cmd as cachefront, run_ok};

#[test]
fn check_config_accepts_the_shipped_config() {
    let out = run_ok(cachefront().args([
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
        "--check-config",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("configuration OK") && text.contains("2 named queries"),
        "{text}"
    );
}

#[test]
fn check_config_without_a_file_uses_the_defaults() {
    let out = cachefront().arg("--check-config").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen 127.0.0.1:6380"));
}

#[test]
fn check_config_names_a_cluster_and_replicas() {
    let out = cachefront()
        .arg("--check-config")
        .env("CACHEFRONT_VALKEY_CLUSTER", "127.0.0.1:7000,127.0.0.1:7001")
        .env(
            "CACHEFRONT_POSTGRES_REPLICAS",
            "postgres://u@127.0.0.1:5433/staff",
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("Valkey Cluster (2 seed nodes), 1 PostgreSQL replica"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cachefront()
        .arg("--check-config")
        .env("CACHEFRONT_VALKEY_CLUSTER", "127.0.0.1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("valkey.cluster"));
}

#[test]
fn bad_config_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[postgres]\npool_sise = 3\n").unwrap();
    let out = cachefront()
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pool_sise"), "{err}");

    let out = cachefront()
        .arg("--check-config")
        .env("CACHEFRONT_POSTGRES_POOL_SIZE", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CACHEFRONT_POSTGRES_POOL_SIZE") && err.contains("postgres.pool_size"),
        "{err}"
    );
}

#[test]
fn env_overrides_apply() {
    let out = cachefront()
        .arg("--check-config")
        .env("CACHEFRONT_LISTEN", "127.0.0.1:7777")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen 127.0.0.1:7777"));
}

#[test]
fn missing_config_file_is_an_error() {
    let out = cachefront()
        .args(["--config", "/nonexistent/cachefront.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cachefront.toml"));
}
