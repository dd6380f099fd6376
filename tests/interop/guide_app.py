#!/usr/bin/env python3
"""An application that caches by hand, exactly as the guide the project came from does
(valkey-py + psycopg2, cache-aside with SETEX). Tests run it next to cachefront to check
that what either one caches, the other serves.

    guide_app.py --valkey-port P --pg-dsn DSN emp <id>          print the name, or None
    guide_app.py --valkey-port P --pg-dsn DSN query <sql-file>  print json.dumps(result)
    guide_app.py --valkey-port P --pg-dsn DSN get <key>         print the raw value, or (nil)
    guide_app.py --valkey-port P --pg-dsn DSN sha <sql-file>    print the guide's cache key

The two functions below are the guide's code; only its example usage is replaced by the
command line. The guide prints errors and returns None; the CLI turns an error into a
non-zero exit status (the message goes to stderr).
"""

import argparse
import hashlib
import json
import sys

import psycopg2
import valkey  # Import the valkey-py library

# The guide's functions print their errors; remember them so the CLI can fail.
_errors = []


def _report(message):
    _errors.append(message)
    print(message, file=sys.stderr)


def get_employee_name_with_caching(conn_params, valkey_params, employee_id, ttl=3600):
    """
    Retrieves employee name from PostgreSQL, caching it in Valkey with a TTL.

    Args:
        conn_params (dict): PostgreSQL connection parameters.
        valkey_params (dict): Valkey connection parameters.
        employee_id (int): ID of the employee.
        ttl (int, optional): Time-to-live (in seconds) for the cached data. Defaults to 3600.

    Returns:
        The employee name (str) or None if not found.
    """

    try:
        v = valkey.Valkey(**valkey_params)  # Connect to Valkey
        cached_name = v.get(f"employee:{employee_id}")

        if cached_name:
            return cached_name.decode("utf-8")

        conn = psycopg2.connect(**conn_params)
        cur = conn.cursor()

        cur.execute("SELECT name FROM employees WHERE id = %s", (employee_id,))
        result = cur.fetchone()

        if result:
            employee_name = result[0]
            v.setex(f"employee:{employee_id}", ttl, employee_name)
            return employee_name
        else:
            return None

    except psycopg2.Error as e:
        _report(f"PostgreSQL Error: {e}")
        return None
    except valkey.ValkeyError as e:
        _report(f"Valkey Error: {e}")
        return None

    finally:
        if "conn" in locals() and conn:
            cur.close()
            conn.close()


def get_employee_department_data(conn_params, valkey_params, query, ttl=3600):
    """
    Executes a SQL query, caches the result in Valkey using a query hash as the key,
    and returns the result.
    Args:
        conn_params (dict): PostgreSQL connection parameters.
        valkey_params (dict): Valkey connection parameters.
        query (str): The SQL query to execute.
        ttl (int, optional): Time-to-live (in seconds) for the cached data. Defaults to 3600.
    Returns:
        A list of dictionaries representing the query result, or None if an error occurs.
    """
    try:
        v = valkey.Valkey(**valkey_params)
        query_hash = hashlib.sha256(query.encode()).hexdigest()  # Hash the query
        cached_result = v.get(query_hash)
        if cached_result:
            return json.loads(cached_result.decode("utf-8"))
        conn = psycopg2.connect(**conn_params)
        cur = conn.cursor()
        cur.execute(query)
        columns = [desc[0] for desc in cur.description]  # Get column names
        result = [dict(zip(columns, row)) for row in cur.fetchall()]
        v.setex(query_hash, ttl, json.dumps(result))  # Store as JSON in Valkey
        return result
    except (psycopg2.Error, valkey.ValkeyError) as e:
        _report(f"Error: {e}")
        return None
    finally:
        if "conn" in locals() and conn:
            cur.close()
            conn.close()


def _read_sql(path):
    # Bytes exactly as in the file (no newline translation), so the key matches
    # a client that sends the same bytes.
    with open(path, "r", encoding="utf-8", newline="") as f:
        return f.read()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--valkey-host", default="127.0.0.1")
    p.add_argument("--valkey-port", type=int, required=True)
    p.add_argument("--valkey-db", type=int, default=0)
    p.add_argument("--pg-dsn", default="", help="libpq DSN or URL (postgres://...)")
    p.add_argument("--ttl", type=int, default=3600)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("emp").add_argument("id", type=int)
    sub.add_parser("query").add_argument("sql_file")
    sub.add_parser("get").add_argument("key")
    sub.add_parser("sha").add_argument("sql_file")
    args = p.parse_args(argv)

    # psycopg2.connect(dsn=...) accepts both "key=value" DSNs and postgres:// URLs.
    conn_params = {"dsn": args.pg_dsn}
    valkey_params = {
        "host": args.valkey_host,
        "port": args.valkey_port,
        "db": args.valkey_db,
        "socket_timeout": 10,
    }

    if args.action == "emp":
        name = get_employee_name_with_caching(conn_params, valkey_params, args.id, args.ttl)
        if _errors:
            return 1
        print(name)  # None when there is no such employee, as in the guide
    elif args.action == "query":
        query = _read_sql(args.sql_file)
        result = get_employee_department_data(conn_params, valkey_params, query, args.ttl)
        if _errors or result is None:
            return 1
        print(json.dumps(result))
    elif args.action == "get":
        try:
            value = valkey.Valkey(**valkey_params).get(args.key)
        except valkey.ValkeyError as e:
            _report(f"Valkey Error: {e}")
            return 1
        if value is None:
            print("(nil)")
        else:
            sys.stdout.flush()
            sys.stdout.buffer.write(value + b"\n")
    elif args.action == "sha":
        print(hashlib.sha256(_read_sql(args.sql_file).encode()).hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
