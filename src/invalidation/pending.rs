//! Invalidations received and not yet applied, merged per table.
//!
//! Applying an invalidation is idempotent (bump versions, drop entries), so what is pending
//! for a table is a set, not a queue: ten changes to one table wait as one. Memory is bounded
//! by tables and rows, never by the number of changes, and no table waits behind another.
//!
//! Bounds, and what happens past them:
//! - more than [`MAX_ROWS_PER_TABLE`] changed rows pending for one table: they become one
//!   table-wide invalidation of it (which drops everything the rows would have);
//! - more than [`MAX_TABLES`] tables pending: they become one flush of every table ever
//!   cached (`all`), as after a lost notification channel.

use std::collections::{BTreeMap, BTreeSet};

/// Changed rows kept per table before they collapse into a table-wide invalidation.
pub const MAX_ROWS_PER_TABLE: usize = 1_000;

/// Tables kept before everything collapses into a flush of every table.
pub const MAX_TABLES: usize = 10_000;

/// One change reported by PostgreSQL (tables by OID, as text).
#[derive(Debug, PartialEq)]
pub enum Change {
    /// Anything in the table may have changed.
    Table(String),
    Rows {
        table: String,
        /// column → distinct key values (as text).
        keys: Vec<(String, Vec<String>)>,
    },
    /// A DDL statement touched these relations and functions (with their partition and
    /// inheritance families): entries depending on them are dropped like on a table-wide
    /// change, and what queries depend on must be resolved again.
    Ddl(Vec<String>),
    /// Something changed that cannot be attributed: flush everything.
    All,
}

/// What one table needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// A table-wide invalidation (subsumes any row changes).
    Table,
    /// Row changes: column → key values.
    Rows(BTreeMap<String, BTreeSet<String>>),
}

impl Work {
    /// `self` then `other`, as one: rows add up, until there are too many; a table-wide
    /// invalidation absorbs them.
    fn merge(&mut self, other: Work) {
        let Work::Rows(mine) = self else { return };
        let Work::Rows(theirs) = other else {
            *self = Work::Table;
            return;
        };
        for (column, values) in theirs {
            mine.entry(column).or_default().extend(values);
        }
        if mine.values().map(BTreeSet::len).sum::<usize>() > MAX_ROWS_PER_TABLE {
            *self = Work::Table;
        }
    }
}

/// Everything pending.
#[derive(Debug, Default, PartialEq)]
pub struct Pending {
    /// Every table any instance ever cached from must be flushed: the notification channel
    /// was (re)established, or [`MAX_TABLES`] was passed. Subsumes `tables`.
    pub all: bool,
    pub tables: BTreeMap<String, Work>,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        !self.all && self.tables.is_empty()
    }

    /// Tables with work pending (for INFO); `all` counts as one more.
    pub fn len(&self) -> usize {
        self.tables.len() + usize::from(self.all)
    }

    /// Adds a notification's change.
    pub fn add(&mut self, change: Change) {
        match change {
            Change::Table(t) => self.add_work(t, Work::Table),
            Change::Ddl(objects) => {
                for o in objects {
                    self.add_work(o, Work::Table)
                }
            }
            Change::All => self.flush_all(),
            Change::Rows { table, keys } => {
                let rows = keys
                    .into_iter()
                    .map(|(c, v)| (c, v.into_iter().collect()))
                    .collect();
                self.add_work(table, Work::Rows(rows))
            }
        }
    }

    /// Adds `work` for `table`, merged with what is already pending for it.
    pub fn add_work(&mut self, table: String, work: Work) {
        if self.all {
            return;
        }
        let full = self.tables.len() >= MAX_TABLES;
        match self.tables.get_mut(&table) {
            Some(w) => w.merge(work),
            None if full => self.flush_all(),
            None => {
                let mut w = Work::Rows(BTreeMap::new());
                w.merge(work);
                self.tables.insert(table, w);
            }
        }
    }

    /// Every table must be flushed (subsumes all per-table work).
    pub fn flush_all(&mut self) {
        self.all = true;
        self.tables.clear();
    }

    /// Adds everything in `other`.
    pub fn merge(&mut self, other: Pending) {
        if other.all {
            self.flush_all();
        }
        for (t, w) in other.tables {
            self.add_work(t, w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(table: &str, values: &[&str]) -> Change {
        Change::Rows {
            table: table.into(),
            keys: vec![("id".into(), values.iter().map(|v| v.to_string()).collect())],
        }
    }

    #[test]
    fn changes_merge_per_table() {
        let mut p = Pending::default();
        p.add(rows("a", &["1", "2"]));
        p.add(rows("a", &["2", "3"]));
        p.add(rows("b", &["1"]));
        let want: BTreeSet<String> = ["1", "2", "3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            p.tables["a"],
            Work::Rows(BTreeMap::from([("id".to_string(), want)]))
        );
        p.add(Change::Table("a".into()));
        p.add(rows("a", &["4"]));
        assert_eq!(p.tables["a"], Work::Table, "table-wide absorbs rows");
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn too_many_rows_become_the_table_and_too_many_tables_everything() {
        let mut p = Pending::default();
        for i in 0..=MAX_ROWS_PER_TABLE {
            p.add(rows("a", &[&i.to_string()]));
        }
        assert_eq!(p.tables["a"], Work::Table);
        for i in 0..MAX_TABLES {
            p.add(Change::Table(format!("t{i}")));
        }
        assert!(p.all && p.tables.is_empty(), "flush everything instead");
        p.add(Change::Table("late".into()));
        assert_eq!(p.len(), 1);
    }
}
