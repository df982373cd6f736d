//! A purpose-built CIF (mmCIF / PDBx, STAR subset) tokenizer and parser.
//!
//! It reads what PDB mmCIF files contain: `data_` blocks, `loop_` tables, `_category.item value`
//! pairs, unquoted values (atom names with primes such as `O3'` are unquoted), `'…'` / `"…"` quoted
//! values (a quote only closes when followed by whitespace), `;`-delimited multi-line text fields and
//! `#` comments. Values borrow from the input text (no per-value allocation), so the big
//! `_atom_site` loop costs one `&str` per field. Save frames and global blocks (not used by the PDB)
//! are rejected with a clear error.
//!
//! Every error names the file and the 1-based line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One category (e.g. `atom_site`): column names and row-major values.
#[derive(Debug, Clone, Default)]
pub struct Table<'a> {
    /// Item names without the category prefix (`Cartn_x`), lower-cased.
    pub columns: Vec<String>,
    /// Row-major values; `values.len() == rows * columns.len()`.
    pub values: Vec<&'a str>,
    /// 1-based line of each row's first value (for error messages).
    pub row_lines: Vec<u32>,
}

impl<'a> Table<'a> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.row_lines.len()
    }

    /// Column index of an item (case-insensitive).
    pub fn col(&self, item: &str) -> Option<usize> {
        let item = item.to_ascii_lowercase();
        self.columns.iter().position(|c| *c == item)
    }

    /// Value at (row, column).
    pub fn get(&self, row: usize, col: usize) -> &'a str {
        self.values[row * self.columns.len() + col]
    }

    /// All values of one column (None if the column is absent).
    pub fn column(&self, item: &str) -> Option<Vec<&'a str>> {
        let c = self.col(item)?;
        Some((0..self.rows()).map(|r| self.get(r, c)).collect())
    }
}

/// One `data_` block.
#[derive(Debug, Clone, Default)]
pub struct Block<'a> {
    pub name: String,
    /// Category name (lower-case, without the leading `_`) → table.
    pub categories: BTreeMap<String, Table<'a>>,
}

impl<'a> Block<'a> {
    /// A category table, if present.
    pub fn category(&self, name: &str) -> Option<&Table<'a>> {
        self.categories.get(&name.to_ascii_lowercase())
    }

    /// All values of `_category.item` (e.g. `"_refine.ls_d_res_high"`), if present.
    pub fn values(&self, tag: &str) -> Option<Vec<&'a str>> {
        let (cat, item) = split_tag(tag)?;
        self.category(&cat)?.column(&item)
    }

    /// The first value of `_category.item` that is not null (`.`/`?`).
    pub fn first(&self, tag: &str) -> Option<&'a str> {
        self.values(tag)?.into_iter().find(|v| !is_null(v))
    }
}

/// `.` and `?` are CIF's "inapplicable" and "unknown" values.
pub fn is_null(v: &str) -> bool {
    v == "." || v == "?"
}

fn split_tag(tag: &str) -> Option<(String, String)> {
    let t = tag.strip_prefix('_').unwrap_or(tag);
    let (c, i) = t.split_once('.')?;
    Some((c.to_ascii_lowercase(), i.to_ascii_lowercase()))
}

/// A lexical token.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok<'a> {
    Tag(&'a str),
    Value(&'a str),
    Loop,
    Data(&'a str),
}

/// Tokenizer over the whole text.
struct Lexer<'a, 'p> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
    line: u32,
    path: &'p Path,
}

impl<'a> Lexer<'a, '_> {
    fn err(&self, line: u32, msg: impl Into<String>) -> Error {
        Error::parse(self.path, line as usize, msg)
    }

    /// Next token and the line it starts on; None at end of input.
    fn next(&mut self) -> Result<Option<(Tok<'a>, u32)>> {
        let b = self.b;
        // Skip whitespace and comments.
        loop {
            if self.pos >= b.len() {
                return Ok(None);
            }
            match b[self.pos] {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'#' => {
                    while self.pos < b.len() && b[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
        let line = self.line;
        let start = self.pos;
        let at_line_start = start == 0 || b[start - 1] == b'\n';
        let c = b[start];
        if c == b';' && at_line_start {
            // Text field: runs to the next line that starts with ';'.
            let mut p = start + 1;
            loop {
                match memchr_nl(b, p) {
                    None => {
                        return Err(self.err(line, "unterminated ';' text field (file truncated?)"))
                    }
                    Some(nl) => {
                        self.line += 1;
                        if nl + 1 < b.len() && b[nl + 1] == b';' {
                            // Value is between the opening ';' and this newline.
                            let v = &self.s[start + 1..nl];
                            self.pos = nl + 2;
                            return Ok(Some((Tok::Value(v.trim_end_matches('\r')), line)));
                        }
                        p = nl + 1;
                    }
                }
            }
        }
        if c == b'\'' || c == b'"' {
            // Quoted: closes at a matching quote followed by whitespace or end of input.
            let mut p = start + 1;
            loop {
                if p >= b.len() || b[p] == b'\n' {
                    return Err(self.err(line, "unterminated quoted value"));
                }
                if b[p] == c && (p + 1 >= b.len() || b[p + 1].is_ascii_whitespace()) {
                    self.pos = p + 1;
                    return Ok(Some((Tok::Value(&self.s[start + 1..p]), line)));
                }
                p += 1;
            }
        }
        // Bare word.
        let mut p = start;
        while p < b.len() && !b[p].is_ascii_whitespace() {
            p += 1;
        }
        self.pos = p;
        let w = &self.s[start..p];
        let tok = if c == b'_' {
            Tok::Tag(w)
        } else if starts_ci(w, "data_") {
            Tok::Data(&w[5..])
        } else if w.eq_ignore_ascii_case("loop_") {
            Tok::Loop
        } else if starts_ci(w, "save_")
            || w.eq_ignore_ascii_case("global_")
            || w.eq_ignore_ascii_case("stop_")
        {
            return Err(self.err(line, format!("unsupported STAR construct `{w}`")));
        } else {
            Tok::Value(w)
        };
        Ok(Some((tok, line)))
    }
}

fn starts_ci(w: &str, prefix: &str) -> bool {
    w.as_bytes()
        .get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix.as_bytes()))
}

fn memchr_nl(b: &[u8], from: usize) -> Option<usize> {
    b.get(from..)?
        .iter()
        .position(|&c| c == b'\n')
        .map(|i| from + i)
}

/// Parse CIF text. `path` is used in error messages only.
pub fn parse<'a>(text: &'a str, path: &Path) -> Result<Vec<Block<'a>>> {
    let mut lx = Lexer {
        s: text,
        b: text.as_bytes(),
        pos: 0,
        line: 1,
        path,
    };
    let mut blocks: Vec<Block<'a>> = Vec::new();
    // One-token look-ahead.
    let mut pending: Option<(Tok<'a>, u32)> = lx.next()?;
    while let Some((tok, line)) = pending.take() {
        match tok {
            Tok::Data(name) => {
                blocks.push(Block {
                    name: name.to_string(),
                    categories: BTreeMap::new(),
                });
                pending = lx.next()?;
            }
            Tok::Tag(tag) => {
                let block = blocks
                    .last_mut()
                    .ok_or_else(|| lx.err(line, "item before any data_ block"))?;
                let (cat, item) = split_tag(tag)
                    .ok_or_else(|| lx.err(line, format!("tag `{tag}` has no `.category` part")))?;
                let value = match lx.next()? {
                    Some((Tok::Value(v), _)) => v,
                    _ => {
                        return Err(
                            lx.err(line, format!("tag `{tag}` has no value (file truncated?)"))
                        )
                    }
                };
                let t = block.categories.entry(cat).or_default();
                if t.row_lines.len() > 1 {
                    return Err(lx.err(line, format!("item `{tag}` repeats a looped category")));
                }
                if t.row_lines.is_empty() {
                    t.row_lines.push(line);
                }
                t.columns.push(item);
                t.values.push(value);
                pending = lx.next()?;
            }
            Tok::Loop => {
                let block = blocks
                    .last_mut()
                    .ok_or_else(|| lx.err(line, "loop_ before any data_ block"))?;
                let mut cat_name: Option<String> = None;
                let mut columns = Vec::new();
                let mut next = lx.next()?;
                while let Some((Tok::Tag(tag), tl)) = next {
                    let (cat, item) = split_tag(tag).ok_or_else(|| {
                        lx.err(tl, format!("tag `{tag}` has no `.category` part"))
                    })?;
                    match &cat_name {
                        None => cat_name = Some(cat),
                        Some(c) if *c != cat => {
                            return Err(
                                lx.err(tl, format!("loop mixes categories `{c}` and `{cat}`"))
                            )
                        }
                        _ => {}
                    }
                    columns.push(item);
                    next = lx.next()?;
                }
                let cat = cat_name.ok_or_else(|| lx.err(line, "loop_ without tags"))?;
                let ncol = columns.len();
                let mut table = Table {
                    columns,
                    values: Vec::new(),
                    row_lines: Vec::new(),
                };
                let mut last_line = line;
                while let Some((Tok::Value(v), vl)) = next {
                    if table.values.len().is_multiple_of(ncol) {
                        table.row_lines.push(vl);
                    }
                    table.values.push(v);
                    last_line = vl;
                    next = lx.next()?;
                }
                if !table.values.len().is_multiple_of(ncol) {
                    return Err(lx.err(
                        last_line,
                        format!(
                            "loop `_{cat}` ends with an incomplete row: {} values for {ncol} columns (file truncated?)",
                            table.values.len()
                        ),
                    ));
                }
                if block.categories.insert(cat.clone(), table).is_some() {
                    return Err(lx.err(line, format!("category `_{cat}` appears twice")));
                }
                pending = next;
            }
            Tok::Value(v) => {
                return Err(lx.err(line, format!("value `{v}` without a tag")));
            }
        }
    }
    if blocks.is_empty() {
        return Err(lx.err(1, "no data_ block (empty or not a CIF file)"));
    }
    Ok(blocks)
}

/// Read a file as UTF-8 text; non-UTF-8 bytes are a parse error naming the line.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    bytes_to_text(bytes, path)
}

/// Convert bytes to a `String`, reporting the line and byte offset of the first invalid byte.
pub fn bytes_to_text(bytes: Vec<u8>, path: &Path) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let off = e.utf8_error().valid_up_to();
        let b = e.as_bytes();
        let line = b[..off].iter().filter(|&&c| c == b'\n').count() + 1;
        Error::parse(
            PathBuf::from(path),
            line,
            format!("invalid UTF-8 byte 0x{:02x} at byte offset {off}", b[off]),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_loops_quotes_and_text_fields() {
        let text = "data_TEST\n_entry.id 1ABC\n_struct.title\n;line one\nline two\n;\n\
                    _a.x 'it''s' _a.y \"O3'\"\nloop_\n_atom.name\n_atom.alt\n_atom.v\n\
                    O3' . 1.5\n'N A' ? -2 # comment\nCA \"B\" 3\n#\n";
        let b = parse(text, Path::new("t.cif")).unwrap();
        assert_eq!(b.len(), 1);
        let bl = &b[0];
        assert_eq!(bl.first("_entry.id"), Some("1ABC"));
        assert_eq!(bl.first("_struct.title"), Some("line one\nline two"));
        assert_eq!(bl.first("_a.x"), Some("it''s"));
        assert_eq!(bl.first("_a.y"), Some("O3'"));
        let t = bl.category("atom").unwrap();
        assert_eq!(t.rows(), 3);
        assert_eq!(t.column("name").unwrap(), vec!["O3'", "N A", "CA"]);
        assert_eq!(t.column("alt").unwrap(), vec![".", "?", "B"]);
        assert_eq!(t.row_lines, vec![12, 13, 14]);
    }

    #[test]
    fn truncation_errors_name_line() {
        let text = "data_X\nloop_\n_a.b\n_a.c\n1 2\n3\n";
        let e = parse(text, Path::new("x.cif")).unwrap_err().to_string();
        assert!(e.contains("x.cif:6") && e.contains("incomplete row"), "{e}");
        let text = "data_X\n_a.b\n;abc\n";
        let e = parse(text, Path::new("x.cif")).unwrap_err().to_string();
        assert!(e.contains("x.cif:3") && e.contains("text field"), "{e}");
        let e = parse("", Path::new("e.cif")).unwrap_err().to_string();
        assert!(e.contains("no data_"), "{e}");
    }

    #[test]
    fn non_utf8_is_reported() {
        let e = bytes_to_text(b"ab\ncd\xff".to_vec(), Path::new("b.cif"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.cif:2") && e.contains("0xff"), "{e}");
    }
}
