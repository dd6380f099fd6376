-- The role cachefront should connect as: it may connect and read the application's tables,
-- and nothing else. This is the last of SQL.CACHED's layers (docs/security.md, "SQL safety"): should a
-- query get past the SQL checks, the READ ONLY transaction and the statement timeout, the
-- role still cannot write, create, read server files or act as another role.
--
-- Run it as the tables' owner (or a superuser), in the application's database; it is
-- idempotent:
--
--   psql -v ON_ERROR_STOP=1 -d staff -v role=cachefront_ro -v password='…' \
--        -f sql/least_privilege.sql
--
-- then point cachefront at it: postgres.url = "postgres://cachefront_ro:…@host/staff", with
-- invalidation.install_triggers = false and the triggers installed once by the owner
-- (`cachefront --config config.toml triggers install`, then run this file again so the
-- role can use the `cachefront` schema it creates).
--
-- Two PUBLIC defaults are worth closing too, for every role, if nothing else relies on them:
-- CREATE on schema public (granted to PUBLIC before PostgreSQL 15) and TEMP on the database:
--   REVOKE CREATE ON SCHEMA public FROM PUBLIC;
--   REVOKE TEMP ON DATABASE staff FROM PUBLIC;

\if :{?role}
\else
  \set role cachefront_ro
\endif

-- LOGIN and nothing more: not a superuser, cannot create roles or databases, bypass
-- row-level security or replicate.
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
\if :{?password}
  ALTER ROLE :"role" PASSWORD :'password';
\endif

-- Every transaction of the role is read-only unless it asks otherwise: named queries, which
-- run outside SQL.CACHED's explicit READ ONLY transaction, get the same guard.
ALTER ROLE :"role" SET default_transaction_read_only = on;

-- Read the tables, now and those created later by the role running this file.
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'role') \gexec
GRANT USAGE ON SCHEMA public TO :"role";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"role";
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO :"role";

-- The invalidation triggers' schema, once `cachefront triggers install` has created it.
SELECT format('GRANT USAGE ON SCHEMA cachefront TO %I', :'role')
 WHERE EXISTS (SELECT FROM pg_namespace WHERE nspname = 'cachefront') \gexec
