//! The ggml tensor types a GGUF file can hold, with the block layout that sizes their data.

/// A ggml element type, by its numeric id in the GGUF tensor info. Only the layout (elements per
/// block, bytes per block) is known here; dequantization is elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Elements per block (1 for the plain types).
    pub block_size: u64,
    /// Bytes per block.
    pub type_size: u64,
}

/// (id, name, block_size, type_size), as in ggml's `type_traits` table. Ids 4, 5 (removed Q4_2 and
/// Q4_3) and 31-33, 36-38 (removed or repacked-only types) never appear in files.
const TABLE: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType::from_row(0);
    pub const F16: GgmlType = GgmlType::from_row(1);
    pub const Q4_1: GgmlType = GgmlType::from_row(3);
    pub const Q8_0: GgmlType = GgmlType::from_row(6);

    const fn from_row(row: usize) -> GgmlType {
        let (id, name, block_size, type_size) = TABLE[row];
        GgmlType {
            id,
            name,
            block_size,
            type_size,
        }
    }

    /// The type with this id; `None` for ids ggml does not define.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE
            .iter()
            .position(|row| row.0 == id)
            .map(GgmlType::from_row)
    }

    /// Bytes taken by `n_elements` values of this type; `None` when `n_elements` is not a whole
    /// number of blocks or the size overflows.
    pub fn byte_size(self, n_elements: u64) -> Option<u64> {
        if !n_elements.is_multiple_of(self.block_size) {
            return None;
        }
        (n_elements / self.block_size).checked_mul(self.type_size)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_constants_match_their_ids() {
        assert_eq!((GgmlType::F32.id, GgmlType::F32.name), (0, "F32"));
        assert_eq!((GgmlType::F16.id, GgmlType::F16.name), (1, "F16"));
        assert_eq!((GgmlType::Q4_1.id, GgmlType::Q4_1.name), (3, "Q4_1"));
        assert_eq!((GgmlType::Q8_0.id, GgmlType::Q8_0.name), (8, "Q8_0"));
        assert_eq!(GgmlType::from_id(30).map(|t| t.name), Some("BF16"));
        assert_eq!(GgmlType::from_id(4), None);
    }

    #[test]
    fn byte_size_counts_whole_blocks_only() {
        assert_eq!(GgmlType::Q4_1.byte_size(576 * 64), Some(576 * 2 * 20));
        assert_eq!(GgmlType::Q8_0.byte_size(33), None);
        assert_eq!(GgmlType::F32.byte_size(u64::MAX), None);
    }
}
