//! tapmirror: the data path of sxm, one process per datapath.
//!
//! It knows disks and blocks, never SRs, VDIs or RPC. Modules:
//!
//! - [`io`]: file I/O on io_uring (registered buffers, fixed files) with a portable fallback
//!   chosen at run time;
//! - [`image`]: the `Image` trait and its drivers (raw, VHD chains, qcow2);
//! - [`nbd`]: the NBD wire codec, a server that exports an `Image`, and an async client;
//! - [`forest`]: the tree of layered images an owner records (walks, checks), and a cache of
//!   parsed record files;
//! - [`copy`]: sparse copy of an image or export into an export or file;
//! - [`mirror`]: live mirroring of guest writes to a remote target;
//! - [`control`]: the control socket (stats, pause, mirror attach by descriptor, drain);
//! - [`process`]: `tapmirror serve` as a detached process that outlives its starter: spawn,
//!   adopt after a restart, stop, reap;
//! - [`datapaths`]: a manager of many such processes, one per image served, each in a folder of
//!   its own: attach, activate, quiesce, mirror, drain, recover after a restart.

pub mod control;
pub mod copy;
pub mod datapaths;
pub mod forest;
pub mod image;
pub mod io;
pub mod mirror;
pub mod nbd;
pub mod process;
#[doc(hidden)]
pub mod testkit;

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// A size as people write it: bytes, or a number with a unit K, M, G or T (powers of 1024,
/// with or without `B` or `iB`, any case: `64M`, `1GiB`, `2g`). The one parser of both
/// binaries' sizes. At most `i64::MAX` bytes, what the storage interface carries.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m: u64 = match unit.strip_suffix("IB").or_else(|| unit.strip_suffix('B')).unwrap_or(&unit) {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {text:?} (use K, M, G or T, powers of 1024)")),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("not a size: {text:?} (a whole number of bytes, or with a unit: 64M, 10G)"))?;
    n.checked_mul(mult).filter(|&b| i64::try_from(b).is_ok()).ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10MB"), Ok(10 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size(" 512 "), Ok(512));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("18446744073709551615").is_err(), "past what the interface carries");
        assert_eq!(parse_size("9223372036854775807"), Ok(i64::MAX as u64));
    }
}
