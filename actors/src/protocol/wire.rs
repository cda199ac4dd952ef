//! The strict shape of a job message, checked before serde reads it: one msgpack map, every map
//! key a string (serde would take an integer key as a field's position), nesting at most
//! [`MAX_DEPTH`], nothing after the map. The walk is iterative (a message nested 10⁵ deep costs
//! a stack of frames on the heap, not the thread's stack) and reads `v` and `id` on the way, so a
//! message refused here still names its job.
//!
//! ```text
//! bytes ─check─▶ Shape { v, id }        every map key a string, depth ≤ MAX_DEPTH, no trailing bytes
//!       └─error─▶ (message, id if the top-level map had a readable one)
//! ```

/// The deepest nesting a job message may have. A job itself nests 4 deep (job → `controlnets` →
/// entry → `image`); unknown keys may add a little.
pub const MAX_DEPTH: usize = 16;

/// What the walk read from the top-level map.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Shape {
    /// `v`, when it is a non-negative integer.
    pub v: Option<u64>,
    /// `id`, when it is a string.
    pub id: Option<String>,
}

/// Why a message is not a job map; `shape` holds what could be read all the same.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeError {
    pub message: String,
    pub shape: Shape,
}

enum Head<'a> {
    Int(i128),
    Str(&'a [u8]),
    Array(u64),
    Map(u64),
    Other(&'static str),
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| "message ends in the middle of a value".to_string())?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn uint(&mut self, n: u64) -> Result<u64, String> {
        Ok(self.take(n)?.iter().fold(0u64, |a, &b| (a << 8) | b as u64))
    }

    fn int(&mut self, n: u64) -> Result<i128, String> {
        let u = self.uint(n)?;
        let bits = 8 * n as u32;
        Ok(((u as i128) << (128 - bits)) >> (128 - bits))
    }

    fn head(&mut self) -> Result<Head<'a>, String> {
        let m = self.take(1)?[0];
        Ok(match m {
            0x00..=0x7f => Head::Int(m as i128),
            0x80..=0x8f => Head::Map((m & 0x0f) as u64),
            0x90..=0x9f => Head::Array((m & 0x0f) as u64),
            0xa0..=0xbf => Head::Str(self.take((m & 0x1f) as u64)?),
            0xc0 => Head::Other("nil"),
            0xc1 => return Err("message holds the reserved byte 0xc1".into()),
            0xc2 | 0xc3 => Head::Other("a boolean"),
            0xc4..=0xc6 => {
                let n = self.uint(1 << (m - 0xc4))?;
                self.take(n)?;
                Head::Other("binary")
            }
            0xc7..=0xc9 => {
                let n = self.uint(1 << (m - 0xc7))?;
                self.take(n + 1)?;
                Head::Other("an extension")
            }
            0xca => {
                self.take(4)?;
                Head::Other("a float")
            }
            0xcb => {
                self.take(8)?;
                Head::Other("a float")
            }
            0xcc..=0xcf => Head::Int(self.uint(1 << (m - 0xcc))? as i128),
            0xd0..=0xd3 => Head::Int(self.int(1 << (m - 0xd0))?),
            0xd4..=0xd8 => {
                self.take((1 << (m - 0xd4)) + 1)?;
                Head::Other("an extension")
            }
            0xd9..=0xdb => {
                let n = self.uint(1 << (m - 0xd9))?;
                Head::Str(self.take(n)?)
            }
            0xdc | 0xdd => Head::Array(self.uint(2 << (m - 0xdc))?),
            0xde | 0xdf => Head::Map(self.uint(2 << (m - 0xde))?),
            0xe0..=0xff => Head::Int((m as i8) as i128),
        })
    }

    /// Skips one value whose container sits at `depth`, checking map keys and nesting.
    fn skip(&mut self, depth: usize) -> Result<(), String> {
        // frames: items left in each open container, and whether it is a map
        let mut stack: Vec<(u64, bool)> = Vec::new();
        loop {
            let is_key = matches!(stack.last(), Some(&(left, true)) if left % 2 == 0);
            let h = self.head()?;
            if is_key && !matches!(h, Head::Str(_)) {
                return Err(format!(
                    "a map key at depth {} is not a string (the protocol's maps have string keys)",
                    depth + stack.len()
                ));
            }
            if let Some(f) = stack.last_mut() {
                f.0 -= 1;
            }
            match h {
                Head::Array(n) if n > 0 => stack.push((n, false)),
                Head::Map(n) if n > 0 => stack.push((n.saturating_mul(2), true)),
                _ => {}
            }
            if depth + stack.len() > MAX_DEPTH {
                return Err(format!("message nests deeper than {MAX_DEPTH} levels"));
            }
            while matches!(stack.last(), Some(&(0, _))) {
                stack.pop();
            }
            if stack.is_empty() {
                return Ok(());
            }
        }
    }
}

fn kind(h: &Head) -> &'static str {
    match h {
        Head::Int(_) => "an integer",
        Head::Str(_) => "a string",
        Head::Array(_) => "an array",
        Head::Map(_) => "a map",
        Head::Other(k) => k,
    }
}

/// Checks the message's shape and reads its `v` and `id`.
pub fn check(bytes: &[u8]) -> Result<Shape, ShapeError> {
    let mut r = Reader { b: bytes, pos: 0 };
    let mut shape = Shape::default();
    let fail = |message: String, shape: Shape| Err(ShapeError { message, shape });
    let n = match r.head() {
        Ok(Head::Map(n)) => n,
        Ok(h) => {
            return fail(
                format!(
                    "message is {}, not a msgpack map (see docs/protocol.md)",
                    kind(&h)
                ),
                shape,
            )
        }
        Err(e) => return fail(format!("message is not a msgpack map: {e}"), shape),
    };
    // the first problem is the answer, but the walk goes on to find the id
    let mut first: Option<String> = None;
    for i in 0..n {
        let key = match r.head() {
            Ok(Head::Str(s)) => Some(s),
            Ok(h) => {
                first.get_or_insert_with(|| {
                    format!(
                        "key #{i} of the job map is {}: the protocol's maps have string keys",
                        kind(&h)
                    )
                });
                None
            }
            Err(e) => return fail(first.unwrap_or(e), shape),
        };
        let at = r.pos;
        let value = match r.head() {
            Ok(h) => h,
            Err(e) => return fail(first.unwrap_or(e), shape),
        };
        match (key, &value) {
            (Some(b"id"), Head::Str(s)) => shape.id = std::str::from_utf8(s).ok().map(String::from),
            (Some(b"v"), Head::Int(v)) => shape.v = u64::try_from(*v).ok(),
            _ => {}
        }
        r.pos = at;
        if let Err(e) = r.skip(1) {
            first.get_or_insert(e);
            if r.pos >= bytes.len() {
                break;
            }
            // a value too deep: skip it without the depth bound to reach the keys after it
            r.pos = at;
            if let Err(e) = skip_unbounded(&mut r) {
                return fail(first.unwrap_or(e), shape);
            }
        }
    }
    if first.is_none() && r.pos != bytes.len() {
        first = Some(format!(
            "message has {} bytes after the job map",
            bytes.len() - r.pos
        ));
    }
    match first {
        Some(m) => fail(m, shape),
        None => Ok(shape),
    }
}

/// Skips one value whatever its keys and nesting (frames on the heap).
fn skip_unbounded(r: &mut Reader) -> Result<(), String> {
    let mut left: Vec<u64> = Vec::new();
    loop {
        let h = r.head()?;
        if let Some(l) = left.last_mut() {
            *l -= 1;
        }
        match h {
            Head::Array(n) if n > 0 => left.push(n),
            Head::Map(n) if n > 0 => left.push(n.saturating_mul(2)),
            _ => {}
        }
        while left.last() == Some(&0) {
            left.pop();
        }
        if left.is_empty() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_map_reads_its_version_and_id() {
        let j = crate::protocol::Job::new("a-1", "b", "p");
        let s = check(&j.encode().unwrap()).unwrap();
        assert_eq!((s.v, s.id.as_deref()), (Some(1), Some("a-1")));
    }

    /// msgpack of a short string (fixstr).
    fn s(x: &str) -> Vec<u8> {
        let mut b = vec![0xa0 | x.len() as u8];
        b.extend(x.as_bytes());
        b
    }

    #[test]
    fn integer_keys_and_arrays_are_refused() {
        // a job as an array (serde reads it by position)
        let e = check(&rmp_serde::to_vec(&crate::protocol::Job::new("x", "b", "p")).unwrap());
        assert!(e.unwrap_err().message.contains("an array, not a msgpack map"));
        // {0: 1, 1: "x"}: field positions as keys
        let b = [vec![0x82, 0x00, 0x01, 0x01], s("x")].concat();
        let e = check(&b).unwrap_err();
        assert!(e.message.contains("key #0 of the job map is an integer"), "{e:?}");
        // a string-keyed map with one integer key: refused, and the id is still read
        let b = [vec![0x83], s("v"), vec![0x01], s("id"), s("y"), vec![0x09, 0x05]].concat();
        let e = check(&b).unwrap_err();
        assert_eq!(e.shape.id.as_deref(), Some("y"));
        assert!(e.message.contains("key #2"), "{e:?}");
        // an integer key in a nested map: {"id": "z", "controlnets": [{0: "cn"}]}
        let b = [
            vec![0x82],
            s("id"),
            s("z"),
            s("controlnets"),
            vec![0x91, 0x81, 0x00],
            s("cn"),
        ]
        .concat();
        let e = check(&b).unwrap_err();
        assert!(e.message.contains("depth 3 is not a string"), "{e:?}");
        // string keys all the way down pass
        let b = [
            vec![0x81],
            s("controlnets"),
            vec![0x91, 0x81],
            s("model"),
            s("cn"),
        ]
        .concat();
        assert!(check(&b).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_naming_the_job() {
        // {"x": [[[[…]]]] 100 000 deep, "v": 1, "id": "deep"}
        let mut b = vec![0x83, 0xa1, b'x'];
        b.extend(std::iter::repeat_n(0x91, 100_000));
        b.push(0xc0);
        b.extend([0xa1, b'v', 0x01, 0xa2, b'i', b'd', 0xa4]);
        b.extend(b"deep");
        let e = check(&b).unwrap_err();
        assert!(e.message.contains("deeper than 16"), "{e:?}");
        assert_eq!(e.shape.id.as_deref(), Some("deep"));
        assert_eq!(e.shape.v, Some(1));
    }

    #[test]
    fn truncated_and_trailing_bytes_are_refused() {
        let j = crate::protocol::Job::new("t", "b", "p").encode().unwrap();
        let e = check(&j[..j.len() - 3]).unwrap_err();
        assert!(e.message.contains("ends in the middle"), "{e:?}");
        let mut more = j.clone();
        more.push(0xc0);
        assert!(check(&more).unwrap_err().message.contains("1 bytes after"));
        // a length far beyond the message does not allocate
        assert!(check(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
