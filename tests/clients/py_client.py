#!/usr/bin/env python3
"""cachefront client compatibility check for redis-py and valkey-py.

    python3 tests/clients/py_client.py redis  <port>
    python3 tests/clients/py_client.py valkey <port>

Talks to a cachefront on 127.0.0.1:<port> through the library's own API only: plain
commands, a 100+ command pipeline, MULTI/EXEC, pub/sub, RESP3 (protocol=3) and cachefront's
own commands through execute_command. Prints one line per check ("ok ..." / "FAIL ...")
and exits 1 if any check failed (2 on bad usage, 3 if the library is not installed).
Run by tests/clients.rs.
"""

import importlib
import sys
import time
import traceback

EMP_1 = "Alice Johnson"
SQL = "SELECT id, name FROM employees ORDER BY id LIMIT 2"
SQL_JSON = '[{"id": 1, "name": "Alice Johnson"}, {"id": 2, "name": "Bob Smith"}]'


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("redis", "valkey"):
        print("usage: py_client.py redis|valkey <port>", file=sys.stderr)
        return 2
    lib_name, port = sys.argv[1], int(sys.argv[2])
    try:
        lib = importlib.import_module(lib_name)
    except ImportError as e:
        pypi = {"redis": "redis", "valkey": "valkey"}[lib_name]
        print(
            f"FAIL python package {pypi!r} is not installed ({e}); "
            "run scripts/deps.sh to install it",
            file=sys.stderr,
        )
        return 3
    client_cls = lib.Redis if lib_name == "redis" else lib.Valkey
    ResponseError = lib.exceptions.ResponseError
    label = f"{lib_name}-py {lib.__version__}"
    p = f"cf:{lib_name}py"  # key prefix of this run
    failures = []

    def check(name, fn):
        """Runs one check; fn returns (got, expected)."""
        try:
            got, expected = fn()
        except Exception as e:  # noqa: BLE001 - any exception is a failed check
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            print(f"FAIL [{label}] {name}: raised {detail}")
            failures.append(name)
            return
        if got == expected:
            print(f"ok   [{label}] {name}")
        elif isinstance(got, list) and isinstance(expected, list) and len(got) == len(expected):
            i = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
            print(
                f"FAIL [{label}] {name}: reply #{i} (of {len(got)}): "
                f"expected {expected[i]!r}, got {got[i]!r}"
            )
            failures.append(name)
        else:
            print(f"FAIL [{label}] {name}: expected {expected!r}, got {got!r}")
            failures.append(name)

    def expect_error(fn, needle):
        """(message, needle) if fn raises ResponseError containing needle."""
        try:
            got = fn()
        except ResponseError as e:
            msg = str(e)
            return (needle if needle in msg else f"error {msg!r}"), needle
        return f"no error, reply {got!r}", needle

    def connect(protocol):
        return client_cls(
            host="127.0.0.1",
            port=port,
            protocol=protocol,
            decode_responses=True,
            socket_timeout=10,
        )

    for proto in (2, 3):
        r = connect(proto)
        pub = connect(proto)
        k = f"{p}:resp{proto}"
        tag = f"RESP{proto}"

        # --- handshake ----------------------------------------------------------------
        check(f"{tag} ping", lambda: (r.ping(), True))
        if proto == 3:
            check(
                "RESP3 HELLO negotiated",
                lambda: (r.execute_command("HELLO", 3)["proto"], 3),
            )

        r.delete(f"{k}:s", f"{k}:h", f"{k}:n", f"{k}:tx", f"{k}:txn")  # reruns start clean
        # --- plain commands -----------------------------------------------------------
        check(f"{tag} SET", lambda: (r.set(f"{k}:s", "v1"), True))
        check(f"{tag} GET", lambda: (r.get(f"{k}:s"), "v1"))
        check(f"{tag} GET missing", lambda: (r.get(f"{k}:nope"), None))
        check(
            f"{tag} HSET",
            lambda: (r.hset(f"{k}:h", mapping={"a": "1", "b": "2"}), 2),
        )
        check(f"{tag} HGETALL", lambda: (r.hgetall(f"{k}:h"), {"a": "1", "b": "2"}))
        check(f"{tag} INCR", lambda: (r.incr(f"{k}:n"), 1))
        check(f"{tag} INCR again", lambda: (r.incr(f"{k}:n"), 2))
        check(f"{tag} DEL", lambda: (r.delete(f"{k}:s", f"{k}:h", f"{k}:n"), 3))
        check(f"{tag} GET after DEL", lambda: (r.get(f"{k}:s"), None))

        # --- cachefront's own commands via the generic command API --------------------
        check(f"{tag} EMP.GET 1", lambda: (r.execute_command("EMP.GET", 1), EMP_1))
        check(f"{tag} EMP.GET 999", lambda: (r.execute_command("EMP.GET", 999), None))
        check(
            f"{tag} EMP.GET abc",
            lambda: expect_error(
                lambda: r.execute_command("EMP.GET", "abc"), "invalid employee id"
            ),
        )
        check(f"{tag} SQL.CACHED", lambda: (r.execute_command("SQL.CACHED", SQL), SQL_JSON))

        # --- pipeline of 100+ commands, cachefront commands mixed in ------------------
        def pipeline():
            pipe = r.pipeline(transaction=False)
            for i in range(100):
                pipe.set(f"{k}:p:{i}", i)
            pipe.execute_command("EMP.GET", 1)
            for i in range(100):
                pipe.get(f"{k}:p:{i}")
            pipe.execute_command("SQL.CACHED", SQL)
            pipe.execute_command("EMP.GET", 999)
            pipe.incr(f"{k}:p:99")
            got = pipe.execute()
            expected = (
                [True] * 100 + [EMP_1] + [str(i) for i in range(100)] + [SQL_JSON, None, 100]
            )
            return got, expected

        check(f"{tag} pipeline of 204 commands", pipeline)

        # --- MULTI/EXEC ---------------------------------------------------------------
        def transaction():
            pipe = r.pipeline(transaction=True)
            pipe.set(f"{k}:tx", "a").append(f"{k}:tx", "bc").get(f"{k}:tx")
            pipe.incr(f"{k}:txn").incrby(f"{k}:txn", 41)
            return pipe.execute(), [True, 3, "abc", 1, 42]

        check(f"{tag} MULTI/EXEC", transaction)

        def emp_get_in_multi():
            pipe = r.pipeline(transaction=True)
            pipe.set(f"{k}:tx2", "x")
            pipe.execute_command("EMP.GET", 1)
            return expect_error(pipe.execute, "not allowed inside MULTI")

        # The spec: cachefront's own commands inside MULTI are refused with a clear error.
        check(f"{tag} EMP.GET inside MULTI refused", emp_get_in_multi)

        # --- pub/sub ------------------------------------------------------------------
        def pubsub():
            ps = r.pubsub()
            chan = f"{k}:chan"
            ps.subscribe(chan)
            first = ps.get_message(timeout=5)
            if not first or first["type"] != "subscribe":
                return f"subscribe confirmation {first!r}", "subscribe"
            receivers = pub.publish(chan, "hello")
            msg = None
            deadline = time.monotonic() + 5
            while msg is None and time.monotonic() < deadline:
                msg = ps.get_message(ignore_subscribe_messages=True, timeout=1)
            ps.unsubscribe(chan)
            ps.close()
            got = (receivers, msg and msg["type"], msg and msg["channel"], msg and msg["data"])
            return got, (1, "message", chan, "hello")

        check(f"{tag} pub/sub", pubsub)

        # The connection is still in order after all of the above.
        check(f"{tag} EMP.GET 1 at the end", lambda: (r.execute_command("EMP.GET", 1), EMP_1))
        r.close()
        pub.close()

    if failures:
        print(f"{label}: {len(failures)} check(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"{label}: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
