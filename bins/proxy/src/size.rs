//! Byte sizes on the command line: `4M`, `256MiB`, `1G`, `65536` (binary multiples).

/// Parses a size with an optional K/M/G/T suffix (powers of 1024, `B`/`iB` optional).
pub(crate) fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a size (try 4M, 256MiB, 1G)"))?;
    let shift = match unit.trim().to_ascii_lowercase().trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse("4M"), Ok(4 << 20));
        assert_eq!(super::parse("256MiB"), Ok(256 << 20));
        assert_eq!(super::parse("1g"), Ok(1 << 30));
        assert_eq!(super::parse("512"), Ok(512));
        assert!(super::parse("4X").is_err());
        assert!(super::parse("M").is_err());
        assert!(super::parse("99999999999T").is_err());
    }
}
