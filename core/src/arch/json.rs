//! Typed reads of `config.json` fields, each error naming the file and the field.

use crate::{Error, Result};
use serde_json::{Map, Value};

/// The top-level object of a JSON file, with the file's name for messages.
pub(crate) struct Fields<'a> {
    object: &'a Map<String, Value>,
    origin: &'a str,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(value: &'a Value, origin: &'a str) -> Result<Fields<'a>> {
        let object = value
            .as_object()
            .ok_or_else(|| Error::format(origin, "expected a JSON object"))?;
        Ok(Fields { object, origin })
    }

    /// The field, treating an explicit `null` as absent (transformers writes `null` defaults).
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.object.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn error(&self, msg: impl Into<String>) -> Error {
        Error::format(self.origin, msg)
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &Value) -> Error {
        self.error(format!("`{key}` must be {expected}, found {got}"))
    }

    pub(crate) fn req_str(&self, key: &str) -> Result<&'a str> {
        let v = self
            .get(key)
            .ok_or_else(|| self.error(format!("missing `{key}`")))?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string", v))
            })
            .transpose()
    }

    /// A positive integer (sizes and counts).
    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .filter(|&n| n > 0)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.wrong_type(key, "a positive integer", v))
            })
            .transpose()
    }

    /// The first of `keys` present (transformers accepts aliases such as `n_head` /
    /// `num_attention_heads`), as a positive integer.
    pub(crate) fn req_usize_any(&self, keys: &[&str]) -> Result<usize> {
        for key in keys {
            if let Some(n) = self.opt_usize(key)? {
                return Ok(n);
            }
        }
        Err(self.error(format!("missing `{}`", keys.join("` / `"))))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| self.wrong_type(key, "a number", v))
            })
            .transpose()
    }

    /// A probability in `[0, 1)` (dropout rates).
    pub(crate) fn opt_probability(&self, key: &str) -> Result<Option<f64>> {
        match self.opt_f64(key)? {
            Some(p) if !(0.0..1.0).contains(&p) => {
                Err(self.error(format!("`{key}` must be in [0, 1), found {p}")))
            }
            p => Ok(p),
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.wrong_type(key, "a boolean", v))
            })
            .transpose()
    }

    /// A nested object, as its own [`Fields`].
    pub(crate) fn opt_object(&self, key: &str) -> Result<Option<Fields<'a>>> {
        self.get(key)
            .map(|v| {
                v.as_object()
                    .map(|object| Fields {
                        object,
                        origin: self.origin,
                    })
                    .ok_or_else(|| self.wrong_type(key, "an object", v))
            })
            .transpose()
    }

    /// A list of strings.
    pub(crate) fn opt_str_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(|items| {
                        items
                            .iter()
                            .map(|s| s.as_str().map(str::to_owned))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| self.wrong_type(key, "a list of strings", v))
            })
            .transpose()
    }
}
