//! A secret's values as the command line gives them: `NAME=VALUE`, `NAME=@FILE` (the file's
//! contents) or `NAME=-` (standard input), each exactly as given: no newline is trimmed,
//! as `vault kv put` takes them.
//!
//! No error here holds a value: an argument is named by its position and the name of its
//! value, never its text (it may be the value itself, its `=` forgotten).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use zeroize::Zeroizing;

use crate::BoxError;

/// One `NAME=VALUE` argument. Its `Debug` shows no value.
#[derive(Clone)]
pub(crate) struct Pair(Zeroizing<String>);

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pair(..)")
    }
}

impl Pair {
    /// clap's parser: any text (it is checked with the others, in [`values`]).
    pub(crate) fn arg(s: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(Zeroizing::new(s.to_owned())))
    }
}

/// Where one value comes from.
enum Source<'a> {
    Text(&'a str),
    File(&'a Path),
    Stdin,
}

/// The values `pairs` give, by name. A name given twice is refused, as is a second `-`
/// (standard input holds one value), an empty name, and a value that is not UTF-8 text.
pub(crate) fn values(
    pairs: &[Pair],
    stdin: &mut dyn Read,
) -> Result<BTreeMap<String, String>, BoxError> {
    let mut out = BTreeMap::new();
    let mut stdin_used = false;
    for (i, pair) in pairs.iter().enumerate() {
        let n = i + 1;
        let Some((name, given)) = pair.0.split_once('=') else {
            return Err(format!(
                "value argument {n} has no `=`: give NAME=VALUE, NAME=@FILE or NAME=- (the argument is not shown: it may be a value)"
            )
            .into());
        };
        if name.is_empty() {
            return Err(format!("value argument {n} has an empty name (=VALUE)").into());
        }
        if out.contains_key(name) {
            return Err(format!(
                "the value {name:?} is given twice (arguments up to {n}): give each name once"
            )
            .into());
        }
        let source = match given {
            "-" => Source::Stdin,
            _ => match given.strip_prefix('@') {
                Some(file) => Source::File(Path::new(file)),
                None => Source::Text(given),
            },
        };
        let value = match source {
            Source::Text(t) => t.to_owned(),
            Source::File(path) => {
                // The name after `@` is not shown: a value that begins with `@` typed by
                // mistake would be.
                let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
                    format!(
                        "the value {name:?}: cannot read the file named after its `@` ({e}); a value that begins with `@` is read from the file it names: give such a value with `-` (standard input) or from a file"
                    )
                })?);
                utf8(name, &bytes, &path.display().to_string())?
            }
            Source::Stdin => {
                if stdin_used {
                    return Err(format!(
                        "the value {name:?}: standard input gives one value only (`-` is used twice)"
                    )
                    .into());
                }
                stdin_used = true;
                let mut bytes = Zeroizing::new(Vec::new());
                stdin
                    .read_to_end(&mut bytes)
                    .map_err(|e| format!("the value {name:?}: cannot read standard input: {e}"))?;
                utf8(name, &bytes, "standard input")?
            }
        };
        out.insert(name.to_owned(), value);
    }
    Ok(out)
}

/// `bytes` as text, or an error naming `name` and `from`, never the bytes.
fn utf8(name: &str, bytes: &[u8], from: &str) -> Result<String, BoxError> {
    std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| {
        format!("the value {name:?} from {from} is not UTF-8 text: a secret's values are strings")
            .into()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn pairs(args: &[&str]) -> Vec<Pair> {
        args.iter().map(|a| Pair::arg(a).unwrap()).collect()
    }

    fn err(args: &[&str], stdin: &[u8]) -> String {
        values(&pairs(args), &mut &stdin[..])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn text_files_and_standard_input_are_taken_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "line 1\nline 2\n").unwrap();
        let at = format!("cert=@{}", file.display());
        let v = values(
            &pairs(&["user=alice", &at, "token=-", "empty=", "eq=a=b"]),
            &mut &b"from stdin\n"[..],
        )
        .unwrap();
        assert_eq!(v["user"], "alice");
        assert_eq!(v["cert"], "line 1\nline 2\n");
        assert_eq!(v["token"], "from stdin\n");
        assert_eq!(v["empty"], "");
        assert_eq!(v["eq"], "a=b");
    }

    #[test]
    fn mistakes_are_refused_without_showing_a_value() {
        let e = err(&["a=1", "hunter2"], b"");
        assert!(
            e.contains("argument 2 has no `=`") && !e.contains("hunter2"),
            "{e}"
        );
        let e = err(&["a=1", "a=hunter2"], b"");
        assert!(
            e.contains("\"a\" is given twice") && !e.contains("hunter2"),
            "{e}"
        );
        let e = err(&["=hunter2"], b"");
        assert!(e.contains("empty name") && !e.contains("hunter2"), "{e}");
        let e = err(&["a=-", "b=-"], b"hunter2");
        assert!(
            e.contains("one value only") && !e.contains("hunter2"),
            "{e}"
        );
        let e = err(&["a=-"], b"\xffhunter2");
        assert!(e.contains("not UTF-8") && !e.contains("hunter2"), "{e}");
        let e = err(&["a=@/nonexistent/file"], b"");
        assert!(
            e.contains("cannot read the file named after its `@`"),
            "{e}"
        );
        let e = err(&["a=@hunter2"], b"");
        assert!(e.contains("\"a\"") && !e.contains("hunter2"), "{e}");
        assert_eq!(format!("{:?}", pairs(&["a=hunter2"])), "[Pair(..)]");
    }
}
