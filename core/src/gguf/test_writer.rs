//! A GGUF writer for tests: builds files byte by byte, valid or deliberately corrupt.

/// Builds a GGUF file in memory, the way llama.cpp's writer lays it out.
pub(crate) struct Writer {
    pub bytes: Vec<u8>,
}

impl Writer {
    pub fn new(version: u32, n_tensors: u64, n_kv: u64) -> Writer {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(n_tensors.to_le_bytes());
        bytes.extend(n_kv.to_le_bytes());
        Writer { bytes }
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend(v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend(v.to_le_bytes());
        self
    }
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.bytes.extend(v);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    pub fn key(&mut self, key: &str, value_type: u32) -> &mut Self {
        self.str(key).u32(value_type)
    }
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(type_id).u64(offset)
    }
    pub fn pad_to(&mut self, alignment: usize) -> &mut Self {
        self.bytes
            .resize(self.bytes.len().next_multiple_of(alignment), 0);
        self
    }
}
