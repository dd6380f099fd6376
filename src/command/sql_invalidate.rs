//! `SQL.INVALIDATE <table> [<table> …]`: drop every entry read from the tables; reply the count.
//! Names are resolved by PostgreSQL as a query would resolve them (`search_path`, quoting,
//! `schema.table`); entries depend on relations by OID.

use futures::FutureExt;
use std::sync::Arc;

use super::Action;
use super::Context;
use crate::cache::Version;
use crate::error::Refusal;
use crate::protocol::{Reply, Request};

pub fn dispatch(ctx: &Arc<Context>, req: &Request) -> Action {
    // At least one table: the arity is checked before dispatch (`command::table`).
    let mut tables = Vec::with_capacity(req.args.len());
    for a in req.args.iter().skip(1) {
        match std::str::from_utf8(a) {
            Ok(t) if !t.trim().is_empty() => tables.push(t.trim().to_string()),
            _ => {
                return Action::Reply(
                    Refusal::InvalidTable(String::from_utf8_lossy(a).into_owned()).reply(),
                )
            }
        }
    }
    let ctx = Arc::clone(ctx);
    Action::Task(
        async move {
            let tables = match resolve(&ctx, &tables).await {
                Ok(t) => t,
                Err(e) => return e.to_reply(),
            };
            // With read replicas, refills must see what the caller wrote before asking (see
            // `db::replicas`). Dropping entries is always safe, so a primary that cannot say
            // where its WAL is does not stop that.
            if let Some(set) = ctx.db.replicas() {
                match ctx.db.wal_insert_lsn_pooled().await {
                    Ok(lsn) => set.raise(tables.iter().flat_map(|t| Version::of_table(t)), lsn),
                    Err(e) => tracing::warn!(error = %e, "SQL.INVALIDATE: cannot read the primary's WAL position; refills may come from a replica that has not replayed the caller's writes"),
                }
            }
            match ctx.cache.invalidate(&tables).await {
                Ok(n) => Reply::Int(n as i64),
                Err(e) => e.to_reply(),
            }
        }
        .boxed(),
    )
}

/// The OIDs (as entries know them) of the named relations that exist; a name PostgreSQL does
/// not know has no entries.
async fn resolve(ctx: &Context, names: &[String]) -> crate::error::Result<Vec<String>> {
    let mut oids = Vec::with_capacity(names.len());
    for name in names {
        if let Some((oid, _)) = ctx.invalidation.resolve_table(&ctx.db, name).await? {
            oids.push(oid.to_string());
        }
    }
    oids.sort();
    oids.dedup();
    Ok(oids)
}
