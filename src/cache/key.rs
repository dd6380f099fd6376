//! Cache key schemes. They are the compatibility contract with applications that cache by
//! hand, so each is spelled out here and pinned by the SPEC's test vectors.

use sha2::{Digest, Sha256};

/// `SQL.CACHED` key: lowercase hex SHA-256 of the query bytes — exactly what
/// `hashlib.sha256(query.encode()).hexdigest()` gives — optionally prefixed. With parameters,
/// each is appended as `\0` + param before hashing, so `$1 = 'a', $2 = 'bc'` and
/// `$1 = 'ab', $2 = 'c'` never share a key.
pub fn sql_key(prefix: &str, query: &[u8], params: &[impl AsRef<[u8]>]) -> String {
    SqlText::new(query).key(prefix, params)
}

/// An `SQL.CACHED` text hashed once: the SHA-256 state after its bytes, which the key with
/// parameters continues from, and the key without any. Kept beside the text's verdict
/// (`command::sql_cached`), so a text seen before costs no hashing: the SHA-256 of the
/// guide's join was about 14,000 instructions, most of what a hit cost.
#[derive(Clone)]
pub struct SqlText {
    state: Sha256,
    /// The hex SHA-256 of the text alone.
    plain: String,
}

impl SqlText {
    pub fn new(query: &[u8]) -> SqlText {
        let mut state = Sha256::new();
        state.update(query);
        let plain = hex::encode(state.clone().finalize());
        SqlText { state, plain }
    }

    /// The key of this text with `params` (see [`sql_key`]).
    pub fn key(&self, prefix: &str, params: &[impl AsRef<[u8]>]) -> String {
        let mut out = String::with_capacity(prefix.len() + 64);
        out.push_str(prefix);
        if params.is_empty() {
            out.push_str(&self.plain);
            return out;
        }
        let mut h = self.state.clone();
        for p in params {
            h.update([0u8]);
            h.update(p.as_ref());
        }
        out.push_str(&hex::encode(h.finalize()));
        out
    }

    /// The hex SHA-256 of the text alone: its key without parameters or prefix.
    pub fn digest(&self) -> &str {
        &self.plain
    }

    /// About how many bytes it holds.
    pub fn size(&self) -> usize {
        std::mem::size_of::<SqlText>() + self.plain.len()
    }
}

/// A named query's key template, e.g. `employee:{1}`: literal text with `{n}` for the n-th
/// argument. Parsed once at start so rendering is a copy loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Arg(usize),
}

impl KeyTemplate {
    /// Parses `template`; every `{n}` must name one of the `nargs` arguments.
    pub fn parse(template: &str, nargs: usize) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in '{template}'"))?
                + open;
            let n: usize = rest[open + 1..close].parse().map_err(|_| {
                format!("'{{{}}}' is not an argument number", &rest[open + 1..close])
            })?;
            if n == 0 || n > nargs {
                return Err(format!("{{{n}}} but the query takes {nargs} argument(s)"));
            }
            parts.push(Part::Arg(n - 1));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("empty key".into());
        }
        Ok(KeyTemplate { parts })
    }

    /// The (0-based) arguments the template uses.
    pub fn args_used(&self) -> Vec<usize> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Arg(i) => Some(*i),
                Part::Lit(_) => None,
            })
            .collect()
    }

    /// Renders the key for validated arguments.
    pub fn render(&self, args: &[impl AsRef<str>]) -> String {
        let mut out = String::with_capacity(32);
        self.render_into(args, &mut out);
        out
    }

    /// Renders the key into a buffer of the calling thread and hands it to `f`. A hit needs
    /// the key only to look it up, so it allocates none (a miss copies it into its plan):
    /// one allocation and free fewer per hit, a good part of what a hit costs.
    pub fn with_rendered<R>(&self, args: &[impl AsRef<str>], f: impl FnOnce(&str) -> R) -> R {
        thread_local! {
            static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut key) => {
                key.clear();
                self.render_into(args, &mut key);
                f(&key)
            }
            // A key rendered while another is in use (`f` rendering again): one of its own.
            Err(_) => f(&self.render(args)),
        })
    }

    fn render_into(&self, args: &[impl AsRef<str>], out: &mut String) {
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Arg(i) => out.push_str(args.get(*i).map(|a| a.as_ref()).unwrap_or_default()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guide's join query, byte for byte as its Python code holds it.
    pub const GUIDE_QUERY: &str = "   \nSELECT   \n    employees.name AS employee_name,   \n    departments.name AS department_name,  \n    employees.job_title \nFROM  \n    employees  \nINNER JOIN  \n    departments   \nON \n    employees.dept_id = departments.id;   \n";

    #[test]
    fn sql_keys_match_hashlib() {
        // hashlib.sha256(b"SELECT 1").hexdigest()
        assert_eq!(
            sql_key("", b"SELECT 1", &[] as &[&[u8]]),
            "e004ebd5b5532a4b85984a62f8ad48a81aa3460c1ca07701f386135d72cdecf5"
        );
        // hashlib.sha256(GUIDE_QUERY.encode()).hexdigest()
        assert_eq!(
            sql_key("", GUIDE_QUERY.as_bytes(), &[] as &[&[u8]]),
            "c6260e61202726451f2251e2051e50764a29e212db01aa5c7119b413d54e2b40"
        );
        assert_eq!(sql_key("db1:", b"SELECT 1", &[] as &[&[u8]]).len(), 4 + 64);
        assert_ne!(
            sql_key("", b"q", &["a", "bc"]),
            sql_key("", b"q", &["ab", "c"])
        );
    }

    /// One hashed text serves every key of it: with each set of parameters (hashlib's
    /// `sha256(b"SELECT $1\x007")`, `…\x008`), and without any, the state left as it was.
    #[test]
    fn a_hashed_text_keys_any_parameters() {
        let text = SqlText::new(b"SELECT $1");
        assert_eq!(
            text.key("db1:", &["7"]),
            "db1:6a2cdf75b5a3b89573826c2d8407172758d6a5020621c937df46d8d2a7631b5c"
        );
        assert_eq!(
            text.key("", &["8"]),
            "51dd426a80005531d61fdff32d731bfcd318fb51cabd8377b4e01831ce671415"
        );
        assert_eq!(
            text.key("", &[] as &[&str]),
            "165a22d8eabe300a7430a1c63e8bd81b6fbc45f42f099dcb508a64eba90c80c1"
        );
        assert_eq!(text.digest(), text.key("", &[] as &[&str]));
    }

    #[test]
    fn a_key_rendered_while_another_is_in_use_gets_its_own_buffer() {
        let t = KeyTemplate::parse("employee:{1}", 1).unwrap();
        let both = t.with_rendered(&["1"], |a| t.with_rendered(&["2"], |b| format!("{a} {b}")));
        assert_eq!(both, "employee:1 employee:2");
        let again = t.with_rendered(&["300"], str::to_string);
        assert_eq!(again, "employee:300", "the buffer is cleared between keys");
    }

    #[test]
    fn templates() {
        let t = KeyTemplate::parse("employee:{1}", 1).unwrap();
        assert_eq!(t.render(&["7"]), "employee:7");
        let t = KeyTemplate::parse("{2}/{1}", 2).unwrap();
        assert_eq!(t.render(&["a", "b"]), "b/a");
        assert!(KeyTemplate::parse("x:{2}", 1).is_err());
        assert!(KeyTemplate::parse("x:{1", 1).is_err());
        assert!(KeyTemplate::parse("x:{a}", 1).is_err());
    }
}
