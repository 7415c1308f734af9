//! The cluster file's tests: what it takes, and each refusal naming its field.

use super::*;
use crate::codec::CodecChoice;

fn dir_with_token(token: &str) -> tempdir::Dir {
    let d = tempdir::Dir::new();
    crate::migration::auth::write_secret_file(&d.path().join("cluster.token"), token.as_bytes())
        .unwrap();
    d
}

/// A throwaway folder for a test's files.
mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "ferry-cluster-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

const EXAMPLE: &str = r#"
token_file = "cluster.token"        # bearer token for the API and shared key for migrations
insecure_api = true
[defaults]
max_concurrent_migrations = 2
[[node]]
name = "a"
control = "127.0.0.1:7411"          # HTTP control API
data = "127.0.0.1:7511"             # incoming migrations
memory_capacity = "8GiB"            # what VMs on this node may use in total
[[node]]
name = "b"
control = "127.0.0.1:7412"
data = "127.0.0.1:7512"
memory_capacity = 4294967296
max_concurrent_migrations = 3
max_bandwidth = "1Gbit/s"
update_hook = ["sh", "-c"]
"#;

#[test]
fn the_issue_example_reads_with_defaults_applied() {
    let d = dir_with_token("  s3cret-s3cret-s3cret\n");
    let c = Cluster::parse(EXAMPLE, &d.path().join("cluster.toml")).unwrap();
    assert_eq!(c.token, "s3cret-s3cret-s3cret");
    // The migration key is derived from the token, never the token.
    assert_eq!(
        c.key,
        crate::migration::auth::derive_migration_key(b"s3cret-s3cret-s3cret")
    );
    assert!(c.insecure_api && c.readonly_token.is_none());
    assert_eq!(c.nodes.len(), 2);
    let a = c.node("a").unwrap();
    assert_eq!(a.control, "127.0.0.1:7411");
    assert_eq!(a.data, "127.0.0.1:7511");
    assert_eq!(a.memory_capacity, 8 << 30);
    assert_eq!(a.max_concurrent_migrations, 2);
    assert_eq!(a.max_bandwidth, None);
    assert_eq!(a.update_hook, None);
    let b = c.node("b").unwrap();
    assert_eq!(b.memory_capacity, 4 << 30);
    assert_eq!(b.max_concurrent_migrations, 3);
    assert_eq!(b.max_bandwidth, Some(125_000_000));
    assert_eq!(b.update_hook, Some(vec!["sh".into(), "-c".into()]));
    assert!(c.require_node("z").unwrap_err().contains("nodes: a, b"));
    assert_eq!(a.codec, CodecChoice::Auto, "auto unless the file says");
    assert!(a.dense && b.dense, "dense pages unless the file says");
    assert!(a.kin_bases && b.kin_bases, "kin bases unless the file says");
}

#[test]
fn kin_bases_set_for_the_cluster_apply_unless_a_node_sets_its_own() {
    let d = dir_with_token("s3cret-s3cret-s3cret");
    let text = EXAMPLE
        .replace("[defaults]\n", "[defaults]\nkin_bases = false\n")
        .replace(
            "max_concurrent_migrations = 3\n",
            "max_concurrent_migrations = 3\nkin_bases = true\n",
        );
    let c = Cluster::parse(&text, &d.path().join("cluster.toml")).unwrap();
    assert!(!c.node("a").unwrap().kin_bases);
    assert!(c.node("b").unwrap().kin_bases);
}

#[test]
fn dense_pages_set_for_the_cluster_apply_unless_a_node_sets_its_own() {
    let d = dir_with_token("s3cret-s3cret-s3cret");
    let text = EXAMPLE
        .replace("[defaults]\n", "[defaults]\ndense = false\n")
        .replace(
            "max_concurrent_migrations = 3\n",
            "max_concurrent_migrations = 3\ndense = true\n",
        );
    let c = Cluster::parse(&text, &d.path().join("cluster.toml")).unwrap();
    assert!(!c.node("a").unwrap().dense);
    assert!(c.node("b").unwrap().dense);
}

#[test]
fn a_codec_set_for_the_cluster_applies_unless_a_node_sets_its_own() {
    let d = dir_with_token("s3cret-s3cret-s3cret");
    let text = EXAMPLE
        .replace("[defaults]\n", "[defaults]\ncodec = \"zstd:3\"\n")
        .replace(
            "max_concurrent_migrations = 3\n",
            "max_concurrent_migrations = 3\ncodec = \"none\"\n",
        );
    let c = Cluster::parse(&text, &d.path().join("cluster.toml")).unwrap();
    let zstd3 = CodecChoice::Fixed(crate::codec::Codec::Zstd { level: 3 });
    assert_eq!(c.node("a").unwrap().codec, zstd3);
    assert_eq!(
        c.node("b").unwrap().codec,
        CodecChoice::Fixed(crate::codec::Codec::None)
    );
}

#[test]
fn a_separate_key_file_is_where_the_migration_key_comes_from() {
    let d = dir_with_token("the-token-0123456789");
    crate::migration::auth::write_secret_file(&d.path().join("k"), b"key-bytes-0123456789\n")
        .unwrap();
    let text = EXAMPLE.replace(
        "token_file = \"cluster.token\"",
        "token_file = \"cluster.token\"\nkey_file = \"k\"",
    );
    let c = Cluster::parse(&text, &d.path().join("cluster.toml")).unwrap();
    assert_eq!(c.token, "the-token-0123456789");
    assert_eq!(
        c.key,
        crate::migration::auth::derive_migration_key(b"key-bytes-0123456789")
    );
}

#[test]
fn the_api_needs_certificates_unless_insecure_and_a_readonly_token_differs() {
    let d = dir_with_token("the-token-0123456789");
    let path = d.path().join("cluster.toml");
    let secure = EXAMPLE.replace("insecure_api = true\n", "");
    let e = Cluster::parse(&secure, &path).unwrap_err().to_string();
    assert!(e.contains("node a: no tls_cert"), "{e}");
    let (cert, key) = crate::transport::tls::TlsServer::generate_pem().unwrap();
    std::fs::write(d.path().join("a.pem"), cert).unwrap();
    crate::migration::auth::write_secret_file(&d.path().join("a-key.pem"), key.as_bytes()).unwrap();
    let with_certs = secure
        .replace(
            "name = \"a\"",
            "name = \"a\"\ntls_cert = \"a.pem\"\ntls_key = \"a-key.pem\"",
        )
        .replace("name = \"b\"", "name = \"b\"\ntls_cert = \"a.pem\"");
    let c = Cluster::parse(&with_certs, &path).unwrap();
    assert!(!c.insecure_api);
    assert!(c.node("a").unwrap().api_cert.is_some());
    assert_eq!(c.node("b").unwrap().api_key_file, None);
    // A read-only token: read, and never the token itself.
    crate::migration::auth::write_secret_file(&d.path().join("ro"), b"read-only-0123456789")
        .unwrap();
    let ro = EXAMPLE.replace(
        "insecure_api = true",
        "insecure_api = true\nreadonly_token_file = \"ro\"",
    );
    let c = Cluster::parse(&ro, &path).unwrap();
    assert_eq!(c.readonly_token.as_deref(), Some("read-only-0123456789"));
    crate::migration::auth::write_secret_file(&d.path().join("ro"), b"the-token-0123456789")
        .unwrap();
    let e = Cluster::parse(&ro, &path).unwrap_err().to_string();
    assert!(e.contains("must differ"), "{e}");
}

#[test]
fn bad_files_are_refused_naming_what_is_wrong() {
    let d = dir_with_token("the-token-0123456789");
    let path = d.path().join("cluster.toml");
    let err = |text: &str| Cluster::parse(text, &path).unwrap_err().to_string();
    assert!(err("token_file = 1").contains("not a valid cluster file"));
    assert!(err("token_file = \"cluster.token\"").contains("no [[node]]"));
    assert!(err("token_file = \"missing\"\n[[node]]\nname=\"a\"\ncontrol=\"h:1\"\ndata=\"h:2\"\nmemory_capacity=1")
        .contains("No such file"));
    let with = |from: &str, to: &str| err(&EXAMPLE.replace(from, to));
    assert!(with("name = \"b\"", "name = \"a\"").contains("node a is named twice"));
    assert!(with("\"127.0.0.1:7412\"", "\"127.0.0.1\"").contains("node b: control"));
    assert!(with("\"8GiB\"", "\"8 parsecs\"").contains("node a: memory_capacity"));
    for n in ["0", "100000"] {
        assert!(with(
            "max_concurrent_migrations = 3",
            &format!("max_concurrent_migrations = {n}")
        )
        .contains("max_concurrent_migrations"));
    }
    assert!(with("\"8GiB\"", "\"2048TiB\"").contains("out of range"));
    assert!(with("\"8GiB\"", "\"8GiB\"\nmax_bandwidth = \"10B/s\"").contains("max_bandwidth"));
    let bad_codec = with("\"8GiB\"", "\"8GiB\"\ncodec = \"zstd:99\"");
    assert!(
        bad_codec.contains("node a: codec \"zstd:99\""),
        "{bad_codec}"
    );
    assert!(with("name = \"b\"", &format!("name = \"{}\"", "b".repeat(300))).contains("node name"));
    assert!(with(
        "memory_capacity = \"8GiB\"",
        "memory_capacity = \"8GiB\"\ncolour = 1"
    )
    .contains("colour"));
    let token = d.path().join("cluster.token");
    crate::migration::auth::write_secret_file(&token, b" \n").unwrap();
    assert!(err(EXAMPLE).contains("is empty"));
    // A short secret, or one its group or others can read, is refused.
    crate::migration::auth::write_secret_file(&token, b"tok").unwrap();
    assert!(err(EXAMPLE).contains("at least 16"));
    crate::migration::auth::write_secret_file(&token, b"the-token-0123456789").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(err(EXAMPLE).contains("group or others"));
}

#[test]
fn image_dirs_keep_images_inside_them_links_resolved() {
    let d = dir_with_token("the-token-0123456789");
    let path = d.path().join("cluster.toml");
    let with = |top: &str| Cluster::parse(&format!("{top}\n{EXAMPLE}"), &path);
    let images = d.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("vm.img"), [0u8; 4096]).unwrap();
    std::fs::write(d.path().join("secret"), [0u8; 4096]).unwrap();
    std::os::unix::fs::symlink(d.path().join("secret"), images.join("link.img")).unwrap();
    // Without the setting any readable path goes.
    let open = with("").unwrap();
    assert!(open.image_dirs.is_none());
    assert_eq!(open.image_allowed(&d.path().join("secret")), Ok(()));
    let c = with(&format!(
        "image_dirs = [{:?}]",
        images.display().to_string()
    ))
    .unwrap();
    assert_eq!(c.image_allowed(&images.join("vm.img")), Ok(()));
    for outside in [
        d.path().join("secret"),
        images.join("link.img"),
        images.join("../secret"),
    ] {
        let e = c.image_allowed(&outside).unwrap_err();
        assert!(e.contains("outside the cluster's image_dirs"), "{e}");
    }
    assert!(c.image_allowed(&images.join("none.img")).is_err());
    for (top, field) in [
        ("image_dirs = []", "out of range"),
        ("image_dirs = [\"images\"]", "not an absolute path"),
    ] {
        let e = with(top).unwrap_err().to_string();
        assert!(e.contains(field), "{top}: {e}");
    }
}

#[test]
fn the_store_settings_are_read_and_each_checked() {
    let d = dir_with_token("the-token-0123456789");
    let path = d.path().join("cluster.toml");
    let with = |top: &str| Cluster::parse(&format!("{top}\n{EXAMPLE}"), &path);
    assert!(with("").unwrap().store.is_none());
    let s = with("etcd = [\"127.0.0.1:2379\", \"127.0.0.1:22379\"]")
        .unwrap()
        .store
        .unwrap();
    assert_eq!(s.client.endpoints.len(), 2);
    assert_eq!(s.prefix, "/ferry/v1/");
    assert_eq!(s.lease_ttl, std::time::Duration::from_secs(5));
    let s = with("etcd = [\"e:2379\"]\netcd_prefix = \"/lab/\"\nlease_ttl = \"9s\"")
        .unwrap()
        .store
        .unwrap();
    assert_eq!((s.prefix.as_str(), s.lease_ttl.as_secs()), ("/lab/", 9));
    let made = rcgen::generate_simple_self_signed(vec!["etcd".to_string()]).unwrap();
    std::fs::write(d.path().join("ca.pem"), made.cert.pem()).unwrap();
    std::fs::write(d.path().join("client.pem"), made.cert.pem()).unwrap();
    std::fs::write(d.path().join("junk.pem"), "not a certificate").unwrap();
    let key = made.signing_key.serialize_pem();
    crate::migration::auth::write_secret_file(&d.path().join("client-key.pem"), key.as_bytes())
        .unwrap();
    crate::migration::auth::write_secret_file(&d.path().join("pw"), b"etcd-password-0123").unwrap();
    let s = with("etcd = [\"e:2379\"]\netcd_ca = \"ca.pem\"\netcd_user = \"ferry\"\netcd_password_file = \"pw\"")
        .unwrap()
        .store
        .unwrap();
    assert_eq!(s.client.tls.unwrap().ca, made.cert.pem().into_bytes());
    let pair = "etcd = [\"e:1\"]\netcd_ca = \"ca.pem\"\netcd_cert = \"client.pem\"\netcd_key = \"client-key.pem\"";
    let identity = with(pair)
        .unwrap()
        .store
        .unwrap()
        .client
        .tls
        .unwrap()
        .identity;
    assert_eq!(identity.unwrap().1, key.trim().as_bytes());
    // The key is a secret: refused when others may read it.
    use std::os::unix::fs::PermissionsExt;
    let key_file = d.path().join("client-key.pem");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = with(pair).unwrap_err().to_string();
    assert!(
        open.contains("etcd_key") && open.contains("group or others"),
        "{open}"
    );
    assert_eq!(s.client.user.unwrap().1, "etcd-password-0123");
    let err = |top: &str| with(top).unwrap_err().to_string();
    for (top, field) in [
        ("etcd = []", "etcd: 0 endpoints"),
        ("etcd = [\"nohost\"]", "etcd: \"nohost\""),
        ("lease_ttl = \"5s\"", "need etcd"),
        ("etcd = [\"e:1\"]\nlease_ttl = \"1s\"", "lease_ttl"),
        ("etcd = [\"e:1\"]\nlease_ttl = \"1h\"", "lease_ttl"),
        ("etcd = [\"e:1\"]\nlease_ttl = \"2500ms\"", "whole seconds"),
        ("etcd = [\"e:1\"]\netcd_prefix = \"ferry\"", "etcd_prefix"),
        ("etcd = [\"e:1\"]\netcd_cert = \"c.pem\"", "need etcd_ca"),
        (
            "etcd = [\"e:1\"]\netcd_ca = \"ca.pem\"\netcd_cert = \"ca.pem\"",
            "go together",
        ),
        ("etcd = [\"e:1\"]\netcd_ca = \"missing.pem\"", "etcd_ca"),
        ("etcd = [\"e:1\"]\netcd_user = \"u\"", "go together"),
        (
            "etcd = [\"e:1\"]\netcd_user = \"u\"\netcd_password_file = \"none\"",
            "etcd_password_file",
        ),
        (
            "etcd = [\"e:1\"]\netcd_user = \"\"\netcd_password_file = \"pw\"",
            "may not be empty",
        ),
        ("etcd_ca = \"ca.pem\"", "need etcd"),
        (
            "etcd = [\"e:1\"]\netcd_ca = \"junk.pem\"",
            "no PEM certificate",
        ),
        (
            "etcd = [\"e:1\"]\netcd_ca = \"ca.pem\"\netcd_cert = \"junk.pem\"\netcd_key = \"pw\"",
            "etcd_cert",
        ),
        ("etcd = [\"e:0\"]", "a port from 1"),
        ("etcd = [\"e1/x:2379\"]", "a port from 1"),
    ] {
        assert!(err(top).contains(field), "{top}: {}", err(top));
    }
}

#[test]
fn max_concurrent_migrations_may_be_auto_for_the_cluster_or_a_node() {
    let d = dir_with_token("s3cret-s3cret-s3cret");
    let path = d.path().join("cluster.toml");
    let text = EXAMPLE.replace(
        "max_concurrent_migrations = 3",
        "max_concurrent_migrations = \"auto\"",
    );
    let c = Cluster::parse(&text, &path).unwrap();
    let (a, b) = (c.node("a").unwrap(), c.node("b").unwrap());
    assert!(!a.auto_concurrency && a.max_concurrent_migrations == 2);
    assert!(b.auto_concurrency, "{b:?}");
    assert_eq!(b.max_concurrent_migrations, 2, "auto chooses 1 or 2");
    let text = EXAMPLE.replace(
        "[defaults]\nmax_concurrent_migrations = 2\n",
        "[defaults]\nmax_concurrent_migrations = \"auto\"\n",
    );
    let c = Cluster::parse(&text, &path).unwrap();
    assert!(c.node("a").unwrap().auto_concurrency);
    assert!(!c.node("b").unwrap().auto_concurrency, "b sets its own 3");
    for bad in ["\"many\"", "-1", "2.5"] {
        let text = EXAMPLE.replace(
            "max_concurrent_migrations = 3",
            &format!("max_concurrent_migrations = {bad}"),
        );
        let e = Cluster::parse(&text, &path).unwrap_err().to_string();
        assert!(e.contains("max_concurrent_migrations"), "{bad}: {e}");
    }
}

#[test]
fn failback_retention_is_a_quarter_of_memory_unless_set_and_kept_in_the_state_folder() {
    let d = dir_with_token("s3cret-s3cret-s3cret");
    let path = d.path().join("cluster.toml");
    let c = Cluster::parse(EXAMPLE, &path).unwrap();
    let a = c.node("a").unwrap();
    assert_eq!(a.failback_retention, a.memory_capacity / 4);
    assert_eq!(a.failback_retention_dir, a.state_dir.join("retained"));
    let text = EXAMPLE.replace(
        "[defaults]\n",
        "[defaults]\nfailback_retention = \"1GiB\"\n",
    );
    let c = Cluster::parse(&text, &path).unwrap();
    assert_eq!(c.node("b").unwrap().failback_retention, 1 << 30);
    let text = EXAMPLE.replace("\"8GiB\"", "\"8GiB\"\nfailback_retention = 0");
    assert_eq!(
        Cluster::parse(&text, &path)
            .unwrap()
            .node("a")
            .unwrap()
            .failback_retention,
        0
    );
    let err = |from: &str, to: &str| {
        Cluster::parse(&EXAMPLE.replace(from, to), &path)
            .unwrap_err()
            .to_string()
    };
    assert!(
        err("\"8GiB\"", "\"8GiB\"\nfailback_retention = \"lots\"").contains("failback_retention")
    );
    assert!(err("\"8GiB\"", "\"8GiB\"\nfailback_retention = \"2048TiB\"").contains("out of range"));
    let e = err(
        "\"8GiB\"",
        "\"8GiB\"\nstate_dir = \"st\"\nfailback_retention_dir = \"st/guests\"",
    );
    assert!(e.contains("folder of their own"), "{e}");
}
