//! ACL-style users (`[[auth.users]]`): authentication, allowed commands, allowed keys. Where
//! Valkey has the same rules (`ACL SETUSER`), the replies are compared byte for byte with a
//! real Valkey configured alike.

mod common;

use common::{
    assert_same_replies as assert_same, call_line as call, encode_line as encode, replies,
};

use cachefront::config::{Config, UserConfig};
use common::services::Valkey;
use common::{Raw, Stack};
use sha2::{Digest, Sha256};

/// All of `cmds` written at once; the replies read after.
async fn pipelined(port: u16, cmds: &[&str]) -> Vec<String> {
    let mut r = Raw::connect(port).await;
    let mut all = Vec::new();
    for c in cmds {
        all.extend(encode(c));
    }
    r.send(&all).await;
    let mut out = Vec::new();
    for _ in cmds {
        out.push(r.frame().await);
    }
    out
}

fn user(name: &str, password: &str, commands: &[&str], keys: &[&str]) -> UserConfig {
    UserConfig {
        name: name.into(),
        password: Some(password.into()),
        passwords: Vec::new(),
        commands: commands.iter().map(|s| s.to_string()).collect(),
        keys: keys.iter().map(|s| s.to_string()).collect(),
        enabled: true,
    }
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A Valkey to compare with, with `setups` run as its default user (e.g. `ACL SETUSER …`).
async fn reference(setups: &[&str]) -> Valkey {
    let v = Valkey::start();
    let mut admin = Raw::connect(v.port()).await;
    for s in setups {
        assert_eq!(call(&mut admin, s).await, "+OK\r\n", "{s}");
    }
    v
}

const HASHED_PW: &str = "hashed-pw";

fn users_like_valkey(c: &mut Config) {
    c.auth.users = vec![
        user(
            "app",
            "apppw",
            &[
                "get",
                "mget",
                "xread",
                "eval",
                "multi",
                "exec",
                "acl|whoami",
            ],
            &["employee:*"],
        ),
        UserConfig {
            enabled: false,
            ..user("off-user", "pw", &["*"], &["*"])
        },
        user(
            "hashed",
            &format!("sha256:{}", sha256_hex(HASHED_PW)),
            &["acl|whoami"],
            &["*"],
        ),
        user("admin2", "adminpw", &["*", "-@dangerous", "-set"], &["*"]),
    ];
}

fn valkey_setups() -> Vec<String> {
    vec![
        "ACL SETUSER app on >apppw +get +mget +xread +eval +multi +exec +acl|whoami ~employee:*"
            .into(),
        "ACL SETUSER off-user off >pw +@all ~*".into(),
        format!(
            "ACL SETUSER hashed on #{} +acl|whoami ~*",
            sha256_hex(HASHED_PW)
        ),
        "ACL SETUSER admin2 on >adminpw +@all -@dangerous -set ~*".into(),
    ]
}

const SEQUENCE: &[&str] = &[
    "AUTH app wrong",
    "AUTH nobody apppw",
    "AUTH off-user pw",
    "HELLO 3 AUTH off-user pw",
    "AUTH app apppw",
    "GET employee:nope",
    "GET other:key",
    "SET employee:1 x",
    "FLUSHALL",
    "MGET employee:a employee:b",
    "MGET employee:a other",
    "GET",
    "NOSUCHCMD x",
    "CONFIG GET maxmemory",
    "CONFIG NOSUCH",
    "ACL WHOAMI",
    "CLIENT ID",
    "PING",
    "XREAD STREAMS employee:s 0",
    "XREAD STREAMS other 0",
    "XREAD STREAMS employee:s other 0 0",
    "EVAL \"return 1\" 1 employee:1",
    "EVAL \"return 1\" 1 other",
    "EVAL \"return 1\" 0",
    "MULTI",
    "GET employee:x",
    "GET other",
    "EXEC",
    "HELLO 3 AUTH app wrong",
    "RESET",
    "ACL WHOAMI",
    "AUTH hashed hashed-pw",
    "ACL WHOAMI",
    "AUTH hashed wrong",
    "AUTH admin2 adminpw",
    "GET k",
    "SET k v",
    "FLUSHALL",
    "KEYS *",
    "DEBUG SLEEP 0",
    "CONFIG GET maxmemory",
    "PING",
    "ACL WHOAMI",
    "HELLO 3 AUTH app apppw",
    "GET other:key",
    "ACL WHOAMI",
];

#[tokio::test]
async fn users_behave_like_valkeys_acl_users() {
    let s = Stack::start_with(users_like_valkey).await;
    let setups = valkey_setups();
    let setups: Vec<&str> = setups.iter().map(String::as_str).collect();
    let v = reference(&setups).await;
    let ours = replies(s.proxy_port(), SEQUENCE).await;
    let theirs = replies(v.port(), SEQUENCE).await;
    assert_same(SEQUENCE, &ours, &theirs);
    // The exact texts, so a change on either side is noticed.
    let wrongpass = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";
    assert_eq!(ours[0], wrongpass);
    assert_eq!(ours[2], wrongpass, "disabled user");
    assert_eq!(ours[4], "+OK\r\n");
    assert_eq!(ours[6], "-NOPERM No permissions to access a key\r\n");
    assert_eq!(
        ours[7],
        "-NOPERM User app has no permissions to run the 'set' command\r\n"
    );
    assert_eq!(
        ours[8],
        "-NOPERM User app has no permissions to run the 'flushall' command\r\n"
    );
    assert_eq!(
        ours[13],
        "-NOPERM User app has no permissions to run the 'config|get' command\r\n"
    );
    assert_eq!(ours[15], "$3\r\napp\r\n");
    assert_eq!(
        ours[27],
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(
        ours[30], "$7\r\ndefault\r\n",
        "RESET logs back in as default"
    );
    assert_eq!(ours[32], "$6\r\nhashed\r\n");
    assert_eq!(ours[45], "$3\r\napp\r\n");
}

#[tokio::test]
async fn pipelined_allowed_and_denied_commands_answer_in_order() {
    let s = Stack::start_with(users_like_valkey).await;
    let setups = valkey_setups();
    let setups: Vec<&str> = setups.iter().map(String::as_str).collect();
    let v = reference(&setups).await;
    let cmds: Vec<&str> = SEQUENCE
        .iter()
        .copied()
        .filter(|c| !c.starts_with("HELLO"))
        .collect();
    let ours = pipelined(s.proxy_port(), &cmds).await;
    let theirs = pipelined(v.port(), &cmds).await;
    assert_same(&cmds, &ours, &theirs);
}

#[tokio::test]
async fn cachefront_commands_obey_users() {
    let s = Stack::start_with(|c| {
        c.auth.users = vec![
            user("app", "apppw", &["@cachefront", "get"], &["employee:*"]),
            user("reader", "r", &["@read"], &["*"]),
            user("emp", "e", &["emp.get", "acl|whoami"], &["employee:1"]),
        ];
    })
    .await;
    let r = replies(
        s.proxy_port(),
        &[
            "AUTH app apppw",
            "EMP.GET 1",
            "GET employee:1",
            "SET x y",
            "GET other:key",
            "FLUSHALL",
            "EMP.GET nope",
            "SQL.CACHED \"SELECT 1 AS one\"",
            "SQL.INVALIDATE employees",
            "EMP.GET",
            "ACL WHOAMI",
        ],
    )
    .await;
    assert_eq!(r[0], "+OK\r\n");
    assert_eq!(r[1], "$13\r\nAlice Johnson\r\n");
    assert_eq!(r[2], "$13\r\nAlice Johnson\r\n");
    assert_eq!(
        r[3],
        "-NOPERM User app has no permissions to run the 'set' command\r\n"
    );
    assert_eq!(r[4], "-NOPERM No permissions to access a key\r\n");
    assert_eq!(
        r[5],
        "-NOPERM User app has no permissions to run the 'flushall' command\r\n"
    );
    assert_eq!(r[6], "-ERR invalid employee id 'nope'\r\n");
    assert_eq!(
        r[7], "-NOPERM No permissions to access a key\r\n",
        "SQL.CACHED's key is its SHA-256, outside employee:*"
    );
    assert!(r[8].starts_with(':'), "{}", r[8]);
    assert_eq!(
        r[9],
        "-ERR wrong number of arguments for 'emp.get' command\r\n"
    );
    assert_eq!(
        r[10],
        "-NOPERM User app has no permissions to run the 'acl|whoami' command\r\n"
    );

    let r = replies(
        s.proxy_port(),
        &[
            "AUTH reader r",
            "EMP.GET 2",
            "SET x y",
            "GET employee:2",
            "SQL.CACHED \"SELECT 1 AS one\"",
            "SQL.INVALIDATE employees",
            "ACL WHOAMI",
        ],
    )
    .await;
    assert_eq!(r[0], "+OK\r\n");
    assert_eq!(r[1], "$9\r\nBob Smith\r\n");
    assert_eq!(
        r[2],
        "-NOPERM User reader has no permissions to run the 'set' command\r\n"
    );
    assert_eq!(r[3], "$9\r\nBob Smith\r\n");
    assert_eq!(r[4], "$12\r\n[{\"one\": 1}]\r\n");
    assert_eq!(
        r[5],
        "-NOPERM User reader has no permissions to run the 'sql.invalidate' command\r\n"
    );
    assert_eq!(
        r[6],
        "-NOPERM User reader has no permissions to run the 'acl|whoami' command\r\n"
    );

    let r = replies(
        s.proxy_port(),
        &[
            "AUTH emp e",
            "EMP.GET 1",
            "EMP.GET 2",
            "ACL WHOAMI",
            "SQL.CACHED \"SELECT 1\"",
        ],
    )
    .await;
    assert_eq!(r[1], "$13\r\nAlice Johnson\r\n");
    assert_eq!(r[2], "-NOPERM No permissions to access a key\r\n");
    assert_eq!(r[3], "$3\r\nemp\r\n");
    assert_eq!(
        r[4],
        "-NOPERM User emp has no permissions to run the 'sql.cached' command\r\n"
    );
}

#[tokio::test]
async fn requirepass_and_users_reset_back_to_default_like_valkey() {
    let s = Stack::start_with(|c| {
        c.auth.requirepass = "secret".into();
        c.auth.users = vec![user("app", "apppw", &["get", "acl|whoami"], &["*"])];
    })
    .await;
    let v = reference(&[
        "ACL SETUSER app on >apppw +get +acl|whoami ~*",
        "CONFIG SET requirepass secret",
    ])
    .await;
    let cmds = &[
        "GET k",
        "ACL WHOAMI",
        "AUTH app apppw",
        "ACL WHOAMI",
        "SET k v",
        "RESET",
        "GET k",
        "ACL WHOAMI",
        "AUTH secret",
        "ACL WHOAMI",
        "SET k v",
        "GET k",
        "AUTH app wrong",
        "ACL WHOAMI",
        "HELLO 3 AUTH app apppw",
        "ACL WHOAMI",
        "RESET",
        "HELLO 2 AUTH default secret",
        "ACL WHOAMI",
    ];
    let ours = replies(s.proxy_port(), cmds).await;
    let theirs = replies(v.port(), cmds).await;
    assert_same(cmds, &ours, &theirs);
    assert_eq!(ours[6], "-NOAUTH Authentication required.\r\n");
    assert_eq!(ours[9], "$7\r\ndefault\r\n");
    assert_eq!(ours[15], "$3\r\napp\r\n");
}

#[tokio::test]
async fn acl_subcommands_other_than_whoami_are_refused_clearly() {
    let s = Stack::start().await;
    let mut r = s.raw().await;
    assert_eq!(call(&mut r, "ACL WHOAMI").await, "$7\r\ndefault\r\n");
    let e = call(&mut r, "ACL SETUSER x on").await;
    assert!(
        e.starts_with("-ERR ACL SETUSER is not supported through cachefront"),
        "{e}"
    );
    assert!(e.contains("[[auth.users]]"), "{e}");
    assert_eq!(
        call(&mut r, "ACL").await,
        "-ERR wrong number of arguments for 'acl' command\r\n"
    );
    let info = call(&mut r, "CLIENT INFO").await;
    assert!(info.contains(" user=default "), "{info}");
}

#[tokio::test]
async fn several_passwords_and_a_default_user_from_the_list() {
    let s = Stack::start_with(|c| {
        c.auth.users = vec![
            UserConfig {
                passwords: vec!["new".into()],
                ..user("default", "old", &["*", "-flushall"], &["*"])
            },
            UserConfig {
                password: None,
                passwords: vec!["one".into(), format!("sha256:{}", sha256_hex("two"))],
                ..user("rot", "", &["get"], &["*"])
            },
        ];
    })
    .await;
    let r = replies(
        s.proxy_port(),
        &[
            "GET k",
            "AUTH old",
            "FLUSHALL",
            "AUTH new",
            "AUTH rot one",
            "AUTH rot two",
            "AUTH rot three",
            "GET k",
        ],
    )
    .await;
    assert_eq!(r[0], "-NOAUTH Authentication required.\r\n");
    assert_eq!(r[1], "+OK\r\n");
    assert_eq!(
        r[2],
        "-NOPERM User default has no permissions to run the 'flushall' command\r\n"
    );
    assert_eq!(r[3], "+OK\r\n");
    assert_eq!(r[4], "+OK\r\n");
    assert_eq!(r[5], "+OK\r\n");
    assert_eq!(
        r[6],
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(r[7], "$-1\r\n");
}

#[test]
fn bad_users_are_refused_with_the_key_named() {
    // Parsed, then checked as at start (users are built by `server::check_config`).
    let err = |toml: &str| {
        Config::from_toml_with_env(toml, Vec::<(String, String)>::new())
            .and_then(|c| cachefront::server::check_config(&c))
            .unwrap_err()
            .to_string()
    };
    let e = err(r#"
[[auth.users]]
name = "a"
password = "p"
commands = ["get"]

[[auth.users]]
name = "b"
password = "p"
commands = ["get"]
keys = ["employee:[0-9"]
"#);
    assert!(e.starts_with("auth.users[1].keys:"), "{e}");
    let e = err(r#"
[auth]
requirepass = "x"
[[auth.users]]
name = "default"
password = "p"
commands = ["*"]
"#);
    assert!(e.starts_with("auth.users[0].name:"), "{e}");
    assert!(e.contains("requirepass"), "{e}");
    let e = err("[[auth.users]]\nname = \"a\"\npassword = \"p\"\ncommands = [\"@nosuch\"]\n");
    assert!(e.starts_with("auth.users[0].commands:"), "{e}");
    let e = err("[[auth.users]]\nname = \"a\"\ncommands = [\"get\"]\n");
    assert!(e.starts_with("auth.users[0].password:"), "{e}");
    let e = err("[[auth.users]]\nname = \"a\"\npassword = \"sha256:abc\"\ncommands = [\"get\"]\n");
    assert!(e.starts_with("auth.users[0].password:"), "{e}");
    let e = err("[[auth.users]]\nname = \"a\"\npassword = \"p\"\n");
    assert!(e.starts_with("auth.users[0].commands:"), "{e}");
    let e =
        err("[[auth.users]]\nname = \"a\"\npassword = \"p\"\ncommands = [\"get\"]\ncolour = 1\n");
    assert!(e.contains("colour"), "{e}");
}

/// The key-pattern glob matches what Valkey's own glob (`KEYS`, the same `stringmatchlen` its
/// ACL uses) matches.
#[tokio::test]
async fn key_patterns_match_like_valkeys_glob() {
    let v = Valkey::start();
    let mut r = Raw::connect(v.port()).await;
    let keys = [
        "employee:1",
        "employee:12",
        "employee:",
        "employees:1",
        "emp",
        "a*b",
        "axb",
        "a]b",
        "a-b",
        "a\\b",
        "x?y",
        "xzy",
        "Employee:1",
        "h[llo",
        "hello",
        "hallo",
        "hxllo",
        "",
    ];
    for k in keys {
        r.cmd(&[b"SET", k.as_bytes(), b"1"]).await;
        assert_eq!(r.frame().await, "+OK\r\n");
    }
    let patterns = [
        "*",
        "employee:*",
        "employee:?",
        "employee:[0-9]",
        "employee:[^1]*",
        "*:*",
        "a\\*b",
        "a[*]b",
        "a[]]b",
        "a[\\]]b",
        "a[a-c-]b",
        "a[-]b",
        "a\\\\b",
        "x\\?y",
        "x?y",
        "h[ae]llo",
        "h[^e]llo",
        "h[a-b]llo",
        "h[b-a]llo",
        "h\\[llo",
        "*1",
        "e*e*1",
        "?",
        "[Ee]mployee:1",
        "**employee**",
    ];
    for p in patterns {
        r.cmd(&[b"KEYS", p.as_bytes()]).await;
        let reply = r.frame().await;
        let mut theirs: Vec<String> = reply
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.starts_with('$') && !l.is_empty())
            .map(str::to_string)
            .collect();
        theirs.sort();
        let mut ours: Vec<String> = keys
            .iter()
            .filter(|k| !k.is_empty())
            .filter(|k| cachefront::acl::glob_match(p.as_bytes(), k.as_bytes()))
            .map(|k| k.to_string())
            .collect();
        ours.sort();
        assert_eq!(ours, theirs, "pattern {p:?}");
    }
}

/// A restricted user's rules hold inside scripts and SORT BY/GET patterns, where the keys are
/// named by Valkey rather than by the request: such commands run as the user's twin in
/// Valkey's own ACL, so the replies match a real Valkey with the same user definition.
#[tokio::test]
async fn key_rules_hold_inside_scripts_and_sort_patterns_like_valkey() {
    let cmds = &[
        "eval", "evalsha", "sort", "rpush", "get", "set", "multi", "exec",
    ];
    let s =
        Stack::start_with(|c| c.auth.users = vec![user("scripter", "pw", cmds, &["app:*"])]).await;
    let v = reference(&[
        "ACL SETUSER scripter on >pw +eval +evalsha +sort +rpush +get +set +multi +exec ~app:*",
    ])
    .await;
    let seed = &[
        "SET other secret",
        "SET app:1 one",
        "RPUSH app:list 2 1",
        "SET app:w_1 5",
        "SET app:w_2 3",
    ];
    replies(s.valkey.port(), seed).await;
    replies(v.port(), seed).await;
    let sequence = &[
        "AUTH scripter pw",
        "EVAL \"return redis.call('GET','app:1')\" 0",
        "EVAL \"return redis.call('GET','other')\" 0",
        "EVAL \"return redis.call('SET','other','x')\" 0",
        "EVAL \"return redis.call('GET',KEYS[1])\" 1 other",
        "EVAL \"return redis.call('FLUSHALL')\" 0",
        "SORT app:list",
        "SORT app:list BY app:w_*",
        "SORT app:list GET other",
        "MULTI",
        "EVAL \"return redis.call('GET','other')\" 0",
        "EXEC",
        "GET other",
        "SET app:2 x",
        "GET app:2",
    ];
    let ours = replies(s.proxy_port(), sequence).await;
    let theirs = replies(v.port(), sequence).await;
    assert_same(sequence, &ours, &theirs);
    assert!(
        ours[2].starts_with("-ERR") && ours[2].contains("access"),
        "{}",
        ours[2]
    );
    assert!(ours[7].contains("SORT"), "{}", ours[7]);
    // Nothing written where the user may not write.
    assert_eq!(
        replies(s.valkey.port(), &["GET other"]).await[0],
        "$6\r\nsecret\r\n"
    );
}

/// When cachefront's own Valkey login may not create users, a restricted user's scripts are
/// refused with a clear error instead of running with cachefront's rights; the rest works.
#[tokio::test]
async fn without_acl_rights_scripts_of_restricted_users_are_refused() {
    let valkey = Valkey::start();
    replies(
        valkey.port(),
        &["ACL SETUSER svc on >svcpw +@all -acl ~* &*"],
    )
    .await;
    let db = tokio::task::spawn_blocking(|| common::services::postgres().fresh_db())
        .await
        .unwrap();
    let mut cfg = common::config_for(&valkey, &db);
    cfg.valkey.url = format!("redis://svc:svcpw@127.0.0.1:{}", valkey.port());
    cfg.auth.users = vec![user("app", "pw", &["eval", "get", "set"], &["app:*"])];
    let proxy = cachefront::server::spawn(cfg).await.unwrap();
    let r = replies(
        proxy.addr.port(),
        &[
            "AUTH app pw",
            "EVAL \"return redis.call('GET','other')\" 0",
            "SET app:1 x",
            "GET app:1",
        ],
    )
    .await;
    assert!(
        r[1].starts_with("-NOPERM cachefront cannot enforce this user's key and command rules"),
        "{}",
        r[1]
    );
    assert_eq!(r[2], "+OK\r\n");
    assert_eq!(r[3], "$1\r\nx\r\n");
}
