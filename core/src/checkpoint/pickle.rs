//! A minimal pickle machine for the `data.pkl` that torch.save writes: it builds plain values
//! (dicts, tuples, strings, ints), and for torch's own callables records what they describe —
//! a storage reference (`BINPERSID`) or a tensor view (`_rebuild_tensor_v2`) — without touching
//! any tensor data. Anything else is refused by name.
//!
//! Values are copied (not shared) into and out of the memo; torch state dicts never mutate a
//! container after fetching it again, so the copy sees the same content. The copies are charged
//! to a budget proportional to the pickle's length, so that a hostile pickle that fetches a value
//! into itself over and over cannot grow memory exponentially.

use std::collections::HashMap;

/// A storage that tensors view: `('storage', torch.<Type>Storage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// The storage class name as pickled, e.g. `FloatStorage`.
    pub type_name: String,
    /// Its entry is `<archive>/data/<key>`.
    pub key: String,
    /// Length in elements.
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2(storage, offset, size, stride, ...)` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// In elements of the storage.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global { module: String, name: String },
    Storage(StorageRef),
    Tensor(TensorRef),
}

impl Value {
    /// The cost of copying the value: its nodes plus the bytes of its strings.
    fn weight(&self) -> usize {
        match self {
            Value::Str(s) => 1 + s.len(),
            Value::Tuple(items) | Value::List(items) => {
                1 + items.iter().map(Value::weight).sum::<usize>()
            }
            Value::Dict(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| k.weight() + v.weight())
                    .sum::<usize>()
            }
            Value::Global { module, name } => 1 + module.len() + name.len(),
            Value::Storage(s) => 1 + s.type_name.len() + s.key.len(),
            Value::Tensor(t) => {
                1 + t.storage.type_name.len() + t.storage.key.len() + t.shape.len() + t.stride.len()
            }
            Value::None | Value::Bool(_) | Value::Int(_) => 1,
        }
    }

    fn describe(&self) -> String {
        match self {
            Value::Global { module, name } => format!("{module}.{name}"),
            Value::Str(s) => format!("string {s:?}"),
            other => format!("{other:?}").chars().take(80).collect(),
        }
    }
    fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Memo copies allowed per byte of pickle, on top of a fixed allowance: a legitimate fetch copies
/// a short string or a global (tens of bytes) for a 2-byte opcode.
const COPY_BUDGET_PER_BYTE: usize = 64;
const COPY_BUDGET_BASE: usize = 1 << 20;

/// Runs the pickle program in `bytes` and returns the value it stops with. Errors give the byte
/// position.
pub fn unpickle(bytes: &[u8]) -> Result<Value, String> {
    let mut m = Machine {
        bytes,
        pos: 0,
        copy_budget: COPY_BUDGET_PER_BYTE
            .saturating_mul(bytes.len())
            .saturating_add(COPY_BUDGET_BASE),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    m.run()
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// What memo copies may still cost (see [`Value::weight`]).
    copy_budget: usize,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let bytes: &'a [u8] = self.bytes;
        let out = self
            .pos
            .checked_add(n)
            .and_then(|end| bytes.get(self.pos..end))
            .ok_or_else(|| format!("pickle truncated: {n} bytes wanted at byte {}", self.pos))?;
        self.pos += n;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("pickle truncated: unterminated line at byte {}", self.pos))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| format!("non-UTF-8 name at byte {}", self.pos))?
            .to_string();
        self.pos += end + 1;
        Ok(s)
    }
    fn utf8(&mut self, len: usize) -> Result<String, String> {
        let at = self.pos;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("invalid UTF-8 string at byte {at}"))
    }
    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| format!("pickle stack underflow at byte {}", self.pos))
    }
    fn top(&mut self) -> Result<&mut Value, String> {
        let pos = self.pos;
        self.stack
            .last_mut()
            .ok_or_else(|| format!("pickle stack underflow at byte {pos}"))
    }
    /// The values pushed since the last MARK, which is removed.
    fn pop_to_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| format!("pickle MARK missing at byte {}", self.pos))?;
        if mark > self.stack.len() {
            return Err(format!("pickle MARK below the stack at byte {}", self.pos));
        }
        Ok(self.stack.split_off(mark))
    }
    fn pop_n(&mut self, n: usize) -> Result<Vec<Value>, String> {
        if self.stack.len() < n {
            return Err(format!("pickle stack underflow at byte {}", self.pos));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }
    /// Charges the copy of `v` to the budget.
    fn charge(&mut self, v: &Value) -> Result<(), String> {
        self.copy_budget = self.copy_budget.checked_sub(v.weight()).ok_or_else(|| {
            format!(
                "pickle copies too much through its memo (byte {}): not a torch.save pickle",
                self.pos
            )
        })?;
        Ok(())
    }
    fn memo_get(&mut self, key: u32) -> Result<Value, String> {
        let pos = self.pos;
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| format!("pickle memo {key} read before it is written (byte {pos})"))?
            .clone();
        self.charge(&v)?;
        Ok(v)
    }
    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        let v = self.top()?.clone();
        self.charge(&v)?;
        self.memo.insert(key, v);
        Ok(())
    }
    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        if items.len() % 2 == 1 {
            return Err(format!(
                "pickle SETITEMS with an odd item count at byte {}",
                self.pos
            ));
        }
        let pos = self.pos;
        let Value::Dict(entries) = self.top()? else {
            return Err(format!("pickle SETITEM on a non-dict at byte {pos}"));
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            match entries.iter_mut().find(|(ek, _)| *ek == k) {
                Some(slot) => slot.1 = v,
                None => entries.push((k, v)),
            }
        }
        Ok(())
    }
    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        let pos = self.pos;
        match self.top()? {
            Value::List(list) => {
                list.extend(items);
                Ok(())
            }
            _ => Err(format!("pickle APPEND on a non-list at byte {pos}")),
        }
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v.into()));
                }
                0x8a => {
                    // LONG1: n little-endian two's-complement bytes.
                    let n = usize::from(self.u8()?);
                    if n > 8 {
                        return Err(format!(
                            "pickle integer of {n} bytes at byte {at} is too large"
                        ));
                    }
                    let raw = self.take(n)?;
                    let mut buf = if raw.last().is_some_and(|&b| b & 0x80 != 0) {
                        [0xff; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(raw);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'X' => {
                    let len = self.u32()? as usize;
                    let s = self.utf8(len)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let len = usize::from(self.u8()?);
                    let s = self.utf8(len)?;
                    self.stack.push(Value::Str(s));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global { module, name });
                }
                0x93 => {
                    // STACK_GLOBAL (protocol 4)
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.stack.push(Value::Global { module, name })
                        }
                        _ => {
                            return Err(format!("pickle STACK_GLOBAL without strings at byte {at}"))
                        }
                    }
                }
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let items = self.pop_n(usize::from(op - 0x84))?;
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_to_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_to_mark()?;
                    self.stack.push(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b's' => {
                    let items = self.pop_n(2)?;
                    self.set_items(items)?;
                }
                b'u' => {
                    let items = self.pop_to_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    self.append(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_to_mark()?;
                    self.append(items)?;
                }
                b'q' => {
                    let key = self.u8()?;
                    self.memo_put(key.into())?;
                }
                b'r' => {
                    let key = self.u32()?;
                    self.memo_put(key)?;
                }
                0x94 => {
                    // MEMOIZE (protocol 4): the next free memo slot.
                    let key = self.memo.len() as u32;
                    self.memo_put(key)?;
                }
                b'h' => {
                    let key = self.u8()?;
                    let v = self.memo_get(key.into())?;
                    self.stack.push(v);
                }
                b'j' => {
                    let key = self.u32()?;
                    let v = self.memo_get(key)?;
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage =
                        storage_from_persistent_id(pid).map_err(|m| format!("{m} (byte {at})"))?;
                    self.stack.push(Value::Storage(storage));
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = reduce(callable, args).map_err(|m| format!("{m} (byte {at})"))?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: only state set on an OrderedDict (`_metadata` of a state dict)
                    // is expected; it carries no tensors and is dropped.
                    self.pop()?;
                    if !matches!(self.top()?, Value::Dict(_)) {
                        return Err(format!("pickle BUILD on a non-dict at byte {at}"));
                    }
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {at}"
                    ))
                }
            }
        }
    }
}

/// `('storage', torch.<Type>Storage, key, location, numel)` → the storage it names.
fn storage_from_persistent_id(pid: Value) -> Result<StorageRef, String> {
    let bad = |pid: &Value| format!("unexpected persistent id {}", pid.describe());
    let Value::Tuple(items) = &pid else {
        return Err(bad(&pid));
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global { module, name }, Value::Str(key), _location, numel]
            if tag == "storage" && module == "torch" =>
        {
            let numel = numel
                .as_int()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| bad(&pid))?;
            Ok(StorageRef {
                type_name: name.clone(),
                key: key.clone(),
                numel,
            })
        }
        _ => Err(bad(&pid)),
    }
}

fn int_tuple(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    let Value::Tuple(items) = v else {
        return Err(format!("tensor {what} is not a tuple"));
    };
    items
        .iter()
        .map(|i| {
            i.as_int()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| format!("tensor {what} holds {}", i.describe()))
        })
        .collect()
}

/// Applies one of the few callables torch.save emits.
fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global { module, name } = &callable else {
        return Err(format!("REDUCE on {}", callable.describe()));
    };
    let Value::Tuple(args) = args else {
        return Err(format!(
            "REDUCE of {module}.{name} without an argument tuple"
        ));
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") if args.is_empty() => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") => {
            let [Value::Storage(storage), offset, shape, stride, ..] = args.as_slice() else {
                return Err("_rebuild_tensor_v2 without (storage, offset, size, stride)".into());
            };
            let offset = offset
                .as_int()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or("_rebuild_tensor_v2 with a bad storage offset")?;
            let shape = int_tuple(shape, "size")?;
            let stride = int_tuple(stride, "stride")?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "tensor size {shape:?} and stride {stride:?} differ in rank"
                ));
            }
            Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset,
                shape,
                stride,
            }))
        }
        // An nn.Parameter saved with keep_vars: the tensor is its first argument.
        ("torch._utils", "_rebuild_parameter") => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        _ => Err(format!("unsupported pickle callable {module}.{name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_appending_list_hits_the_copy_budget() {
        // PROTO 2, EMPTY_LIST, BINPUT 0, then (BINGET 0, APPEND, BINPUT 0) doubling the list each
        // round: 64 rounds would be 2^64 values.
        let mut program = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            program.extend_from_slice(&[b'h', 0, b'a', b'q', 0]);
        }
        program.push(b'.');
        let err = unpickle(&program).unwrap_err();
        assert!(err.contains("copies too much"), "{err}");
    }

    #[test]
    fn ordered_dict_with_metadata_state() {
        // collections.OrderedDict() filled by SETITEMS, then BUILD with a `_metadata` state, as a
        // module's state_dict() pickles: the state is dropped, the items kept.
        let mut p = vec![0x80, 2];
        p.extend_from_slice(b"ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00aK\x07u");
        p.extend_from_slice(b"}X\x09\x00\x00\x00_metadatah\x00)Rsb.");
        let v = unpickle(&p).unwrap();
        assert_eq!(
            v,
            Value::Dict(vec![(Value::Str("a".into()), Value::Int(7))])
        );
    }
}
