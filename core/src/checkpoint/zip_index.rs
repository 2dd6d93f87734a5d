//! The central directory of a zip archive (zip64 included), read straight from the archive's
//! bytes: each entry's name, compression method and the byte range of its stored data. torch.save
//! writes its entries uncompressed, so a tensor's data is a plain slice of the (mapped) file.
//! Every count and offset is checked against the archive length before use.

use std::collections::HashMap;

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
const EOCD_LEN: usize = 22;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: usize = 30;
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// Method 0 in the zip format: the data is stored as is.
pub const STORED: u16 = 0;

/// One entry of the archive.
#[derive(Debug, Clone)]
pub struct ZipEntry {
    pub method: u16,
    /// Absolute byte range of the entry's (possibly compressed) data in the archive.
    pub data: std::ops::Range<usize>,
}

/// Little-endian reads that fail (with a message) instead of running past the end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn u16(&self, at: usize) -> Result<u16, String> {
        self.array::<2>(at).map(u16::from_le_bytes)
    }
    fn u32(&self, at: usize) -> Result<u32, String> {
        self.array::<4>(at).map(u32::from_le_bytes)
    }
    fn u64(&self, at: usize) -> Result<u64, String> {
        self.array::<8>(at).map(u64::from_le_bytes)
    }
    fn array<const N: usize>(&self, at: usize) -> Result<[u8; N], String> {
        self.slice(at, N)
            .map(|s| s.try_into().expect("slice of length N"))
    }
    fn slice(&self, at: usize, len: usize) -> Result<&[u8], String> {
        at.checked_add(len)
            .and_then(|end| self.bytes.get(at..end))
            .ok_or_else(|| {
                format!(
                    "zip structure at byte {at} (+{len}) runs past the end of the file ({} bytes)",
                    self.bytes.len()
                )
            })
    }
}

fn to_usize(v: u64, what: &str, file_len: usize) -> Result<usize, String> {
    usize::try_from(v)
        .ok()
        .filter(|&v| v <= file_len)
        .ok_or_else(|| format!("zip {what} {v} exceeds the file length {file_len}"))
}

/// Finds the end-of-central-directory record, searching back over a possible archive comment.
fn find_eocd(r: &Reader) -> Result<usize, String> {
    let len = r.bytes.len();
    if len < EOCD_LEN {
        return Err(format!("not a zip archive: {len} bytes is too short"));
    }
    let lowest = len.saturating_sub(EOCD_LEN + u16::MAX as usize);
    (lowest..=len - EOCD_LEN)
        .rev()
        .find(|&at| r.u32(at) == Ok(EOCD_SIG))
        .ok_or_else(|| "not a zip archive: no end-of-central-directory record".to_string())
}

/// The entries of the archive by name.
pub fn read_index(bytes: &[u8]) -> Result<HashMap<String, ZipEntry>, String> {
    let r = Reader { bytes };
    let len = bytes.len();
    let eocd = find_eocd(&r)?;
    let mut count = u64::from(r.u16(eocd + 10)?);
    let mut cd_size = u64::from(r.u32(eocd + 12)?);
    let mut cd_offset = u64::from(r.u32(eocd + 16)?);
    if eocd >= 20 && r.u32(eocd - 20)? == ZIP64_LOCATOR_SIG {
        let z = to_usize(r.u64(eocd - 20 + 8)?, "zip64 record offset", len)?;
        if r.u32(z)? != ZIP64_EOCD_SIG {
            return Err(format!(
                "no zip64 end-of-central-directory record at byte {z}"
            ));
        }
        count = r.u64(z + 32)?;
        cd_size = r.u64(z + 40)?;
        cd_offset = r.u64(z + 48)?;
    }
    let cd_offset = to_usize(cd_offset, "central directory offset", len)?;
    let cd_size = to_usize(cd_size, "central directory size", len)?;
    if cd_offset.checked_add(cd_size).is_none_or(|end| end > len) {
        return Err(format!(
            "zip central directory [{cd_offset}, +{cd_size}) exceeds the file ({len} bytes)"
        ));
    }
    if count > (cd_size / CENTRAL_LEN) as u64 {
        return Err(format!(
            "zip says {count} entries, more than its {cd_size}-byte central directory can hold"
        ));
    }
    let mut entries = HashMap::with_capacity(count as usize);
    let mut at = cd_offset;
    for _ in 0..count {
        if r.u32(at)? != CENTRAL_SIG {
            return Err(format!("corrupt zip central directory at byte {at}"));
        }
        let method = r.u16(at + 10)?;
        let mut compressed = u64::from(r.u32(at + 20)?);
        let mut uncompressed = u64::from(r.u32(at + 24)?);
        let name_len = usize::from(r.u16(at + 28)?);
        let extra_len = usize::from(r.u16(at + 30)?);
        let comment_len = usize::from(r.u16(at + 32)?);
        let mut local = u64::from(r.u32(at + 42)?);
        let name_bytes = r.slice(at + CENTRAL_LEN, name_len)?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let extra = r.slice(at + CENTRAL_LEN + name_len, extra_len)?;
        read_zip64_extra(extra, &mut uncompressed, &mut compressed, &mut local)
            .map_err(|m| format!("zip entry `{name}`: {m}"))?;
        let local = to_usize(local, "local header offset", len)?;
        if r.u32(local)? != LOCAL_SIG {
            return Err(format!(
                "zip entry `{name}`: no local header at byte {local}"
            ));
        }
        let start =
            local + LOCAL_LEN + usize::from(r.u16(local + 26)?) + usize::from(r.u16(local + 28)?);
        let compressed = to_usize(compressed, "entry size", len)?;
        if start.checked_add(compressed).is_none_or(|end| end > len) {
            return Err(format!(
                "zip entry `{name}`: data [{start}, +{compressed}) exceeds the file ({len} bytes)"
            ));
        }
        if method == STORED && compressed as u64 != uncompressed {
            return Err(format!(
                "zip entry `{name}`: stored entry with size {uncompressed} but {compressed} bytes of data"
            ));
        }
        entries.insert(
            name,
            ZipEntry {
                method,
                data: start..start + compressed,
            },
        );
        at += CENTRAL_LEN + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

/// Replaces the 32-bit fields saturated at 0xFFFFFFFF by their values in the zip64 extra field,
/// which holds only the saturated ones, in this order.
fn read_zip64_extra(
    extra: &[u8],
    uncompressed: &mut u64,
    compressed: &mut u64,
    local: &mut u64,
) -> Result<(), String> {
    let r = Reader { bytes: extra };
    let mut at = 0;
    while at + 4 <= extra.len() {
        let id = r.u16(at)?;
        let size = usize::from(r.u16(at + 2)?);
        if id == ZIP64_EXTRA_ID {
            let mut field = at + 4;
            for value in [uncompressed, compressed, local] {
                if *value == u64::from(u32::MAX) {
                    if field + 8 > at + 4 + size {
                        return Err("zip64 extra field too short".into());
                    }
                    *value = r.u64(field)?;
                    field += 8;
                }
            }
            return Ok(());
        }
        at += 4 + size;
    }
    Ok(())
}
