//! Training checkpoints: everything a run needs to continue exactly where it stopped, so that a
//! run resumed after a crash or a `kill -9` ends with the same adapter, bit for bit, as one that
//! never stopped (on CUDA, as far as its kernels are deterministic: see `tests/cuda_resume.rs`).
//! CPU and CUDA runs write the same files.
//!
//! # Format
//!
//! `checkpoint-<step>/` in the output directory, `<step>` being the optimizer steps done:
//!
//! - `adapter_config.json`, `adapter_model.safetensors`: the PEFT adapter after `<step>` steps
//!   (f32, loadable by PEFT like `final/`).
//! - `optimizer.safetensors`: AdamW's moments, f32, each shaped like its parameter and named
//!   after it: `<module>.lora_A.exp_avg`, `<module>.lora_A.exp_avg_sq`, and the same for
//!   `lora_B` (`<module>` as in the adapter, e.g. `transformer.h.0.self_attention.query_key_value`).
//! - `trainer_state.json` ([`TrainerState`], written with serde):
//!   - `format` (`"qlora-trainer-checkpoint"`) and `version` (1);
//!   - `global_step`: optimizer steps done; `optimizer_step`: AdamW's update count (the same
//!     number, kept apart because the bias correction depends on it);
//!   - `epoch`: the 0-based epoch in progress; `steps_in_epoch`: its optimizer steps already
//!     done (when all are, the next step starts the next epoch);
//!   - `epoch_shuffle_rng`: the shuffle generator at the start of `epoch`, before it drew the
//!     epoch's permutation, which it regenerates along with every later epoch's;
//!     `dropout_rng`: the dropout generator now. A generator is ChaCha12 (rand's `StdRng`):
//!     `{"seed": 64 hex digits, "stream": n, "word_pos": "decimal u128"}`;
//!   - `best`: `{"step", "val_loss"}` of the lowest validation loss so far (its adapter is
//!     `best_model/`), or `null`;
//!   - `tokens`: real tokens trained on; `first_loss`, `last_loss`: the training loss of step 1
//!     and of step `global_step`;
//!   - `log_lines`: the lines of `train_log.jsonl` that belong to the checkpoint (one per step);
//!   - `run`: what identifies the run, as `"flag": "value"` (the base model, the data's digests,
//!     every option that changes the result); a resumed run must match it.
//!
//!   Floating-point values are strings holding Rust's shortest round-trip form, so they read
//!   back exactly (a validation loss decides which adapter is the best one).
//!
//! # Atomicity
//!
//! A checkpoint is built in `checkpoint-<step>.tmp-<pid>/`, each file synced, then renamed to
//! `checkpoint-<step>/`: a directory with exactly that name is complete. A kill at any moment
//! leaves the earlier checkpoints whole and at most a temporary directory, which
//! [`recover_out_dir`] removes. Checkpoints beyond `--save_total_limit` are renamed away before
//! they are deleted, so none is ever seen half-deleted. The log line of a step is written and
//! synced before the step's checkpoint, so the log always has the checkpoint's lines; lines
//! past them (steps a killed run took after its last checkpoint) are dropped on resume.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use qlora_core::checkpoint::{SafetensorsFile, SafetensorsWriter, TensorInfo, TensorSource};
use qlora_core::data::Example;
use qlora_core::fsutil::{AtomicDir, AtomicFile};
use qlora_core::peft::LoraAdapter;
use qlora_core::{DType, Error, Result};
use rand_chacha::ChaCha12Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::optimizer::AdamW;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const FORMAT: &str = "qlora-trainer-checkpoint";
const VERSION: u32 = 1;
const PREFIX: &str = "checkpoint-";

/// The directory name of the checkpoint after `step` steps.
pub fn checkpoint_name(step: usize) -> String {
    format!("{PREFIX}{step}")
}

/// The step of a complete checkpoint's directory name (`checkpoint-<digits>`), else `None`.
pub fn checkpoint_step(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(PREFIX)?;
    digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| digits.parse().ok())
        .flatten()
}

/// The complete checkpoints in `out_dir`, by step.
pub fn checkpoints(out_dir: &Path) -> Result<BTreeMap<usize, PathBuf>> {
    let mut found = BTreeMap::new();
    for entry in fs::read_dir(out_dir).map_err(|e| Error::io(out_dir, e))? {
        let entry = entry.map_err(|e| Error::io(out_dir, e))?;
        if let Some(step) = entry.file_name().to_str().and_then(checkpoint_step) {
            if entry.path().is_dir() {
                found.insert(step, entry.path());
            }
        }
    }
    Ok(found)
}

/// The checkpoint with the most steps in `out_dir`, if any.
pub fn latest_checkpoint(out_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(out_dir)?.pop_last().map(|(_, dir)| dir))
}

/// Undoes what a killed run left half-done in `out_dir`: removes temporary files and directories
/// (`*.tmp-<pid>`, `*.deleting-<pid>`), and puts back a directory that was moved aside to be
/// replaced (`best_model.old-<pid>` when no `best_model/` took its place).
pub fn recover_out_dir(out_dir: &Path) -> Result<()> {
    for entry in fs::read_dir(out_dir).map_err(|e| Error::io(out_dir, e))? {
        let entry = entry.map_err(|e| Error::io(out_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some((original, _pid)) = name.rsplit_once(".old-") {
            let original = out_dir.join(original);
            if !original.exists() {
                fs::rename(&path, &original).map_err(|e| Error::io(&path, e))?;
                continue;
            }
        } else if !(name.contains(".tmp-") || name.contains(".deleting-")) {
            continue;
        }
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// A ChaCha12 generator's position: with it the generator continues exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte key, hex.
    pub seed: String,
    pub stream: u64,
    /// 32-bit words drawn so far, decimal (a `u128`, beyond JSON's exact integers).
    pub word_pos: String,
}

impl RngState {
    pub fn of(rng: &ChaCha12Rng) -> RngState {
        RngState {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// The generator; `file` names the state's file in messages.
    pub fn restore(&self, file: &str) -> Result<ChaCha12Rng> {
        use rand::SeedableRng;
        let bad = |what: &str| Error::format(file, format!("bad generator state: {what}"));
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err(bad("the seed should be 64 hex digits"));
        }
        let mut seed = [0u8; 32];
        for (byte, pair) in seed.iter_mut().zip(self.seed.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).expect("checked to be ASCII");
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad("the seed is not hex"))?;
        }
        let word_pos: u128 = self
            .word_pos
            .parse()
            .map_err(|_| bad("word_pos is not a decimal integer"))?;
        let mut rng = ChaCha12Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// An `f64` that goes through JSON exactly: Rust's shortest round-trip decimal, as a string.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExactF64(pub f64);

impl Serialize for ExactF64 {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:?}", self.0))
    }
}

impl<'de> Deserialize<'de> for ExactF64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map(ExactF64)
            .map_err(|_| serde::de::Error::custom(format!("`{text}` is not a number")))
    }
}

/// The lowest validation loss so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestState {
    pub step: usize,
    pub val_loss: ExactF64,
}

/// `trainer_state.json` as stored: the format's name and version, then the state.
#[derive(Serialize, Deserialize)]
struct StateFile<S> {
    format: String,
    version: u32,
    #[serde(flatten)]
    state: S,
}

/// `trainer_state.json`: see the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub optimizer_step: u64,
    pub epoch: usize,
    pub steps_in_epoch: usize,
    pub epoch_shuffle_rng: RngState,
    pub dropout_rng: RngState,
    pub best: Option<BestState>,
    pub tokens: usize,
    pub first_loss: Option<ExactF64>,
    pub last_loss: Option<ExactF64>,
    pub log_lines: usize,
    pub run: BTreeMap<String, String>,
}

/// A trainable parameter as the optimizer sees it: its name in the adapter
/// (`<module>.lora_A` / `<module>.lora_B`) and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    /// The matrices of `module`'s adapter: A `[r, in_features]`, then B `[out_features, r]`.
    pub fn lora_pair(
        module: &str,
        r: usize,
        in_features: usize,
        out_features: usize,
    ) -> [ParamSpec; 2] {
        [
            ParamSpec {
                name: format!("{module}.lora_A"),
                shape: vec![r, in_features],
            },
            ParamSpec {
                name: format!("{module}.lora_B"),
                shape: vec![out_features, r],
            },
        ]
    }

    /// Values in the parameter.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

/// Writes `checkpoint-<global_step>/` into `out_dir` as a whole (see the module documentation),
/// replacing one of that step, then deletes the oldest checkpoints beyond `keep`.
pub fn save_checkpoint(
    out_dir: &Path,
    adapter: &LoraAdapter,
    params: &[ParamSpec],
    optimizer: &AdamW,
    state: &TrainerState,
    keep: Option<usize>,
) -> Result<PathBuf> {
    let dir = AtomicDir::create(&out_dir.join(checkpoint_name(state.global_step)), true)?;
    adapter.save(dir.path())?;

    let moments = [optimizer.first_moments(), optimizer.second_moments()];
    let plan: Vec<TensorInfo> = params
        .iter()
        .flat_map(|p| {
            MOMENTS.map(|moment| TensorInfo {
                name: format!("{}.{moment}", p.name),
                dtype: DType::F32,
                shape: p.shape.clone(),
            })
        })
        .collect();
    let mut writer = SafetensorsWriter::create(&dir.join(OPTIMIZER_FILE), &plan)?;
    for (i, info) in plan.iter().enumerate() {
        let values = &moments[i % 2][i / 2];
        writer.write_tensor(&info.name, &qlora_core::dtype::from_f32(DType::F32, values))?;
    }
    writer.commit()?;

    let state_path = dir.join(STATE_FILE);
    let mut file = AtomicFile::create(&state_path)?;
    let stored = StateFile {
        format: FORMAT.to_string(),
        version: VERSION,
        state,
    };
    let json = serde_json::to_string_pretty(&stored).expect("the state serializes");
    file.write_all(json.as_bytes())
        .map_err(|e| Error::io(&state_path, e))?;
    file.commit()?;

    // Each file was synced before its rename (AtomicFile); the renames themselves must reach the
    // disk before the checkpoint's name does, and that rename before the run goes on.
    sync_path(dir.path())?;
    let target = dir.commit()?;
    sync_path(out_dir)?;
    if let Some(keep) = keep {
        remove_oldest(out_dir, keep)?;
    }
    Ok(target)
}

fn sync_path(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Deletes all but the newest `keep` checkpoints, each renamed away first.
fn remove_oldest(out_dir: &Path, keep: usize) -> Result<()> {
    let all = checkpoints(out_dir)?;
    let excess = all.len().saturating_sub(keep);
    for (step, dir) in all.into_iter().take(excess) {
        let doomed = out_dir.join(format!(
            "{}.deleting-{}",
            checkpoint_name(step),
            std::process::id()
        ));
        fs::rename(&dir, &doomed).map_err(|e| Error::io(&dir, e))?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
    }
    Ok(())
}

/// A checkpoint read back.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub adapter: LoraAdapter,
    pub state: TrainerState,
    optimizer: SafetensorsFile,
}

impl Checkpoint {
    pub fn load(dir: &Path) -> Result<Checkpoint> {
        let state_path = dir.join(STATE_FILE);
        let file = state_path.display().to_string();
        let text = fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let stored: StateFile<TrainerState> = serde_json::from_str(&text)
            .map_err(|e| Error::format(&file, format!("not a trainer state: {e}")))?;
        if (stored.format.as_str(), stored.version) != (FORMAT, VERSION) {
            return Err(Error::format(
                &file,
                format!(
                    "format `{}` version {}, this qlora reads `{FORMAT}` version {VERSION}",
                    stored.format, stored.version
                ),
            ));
        }
        let state = stored.state;
        if state.log_lines != state.global_step || state.optimizer_step != state.global_step as u64
        {
            return Err(Error::format(
                &file,
                "global_step, optimizer_step and log_lines disagree",
            ));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            adapter: LoraAdapter::load(dir)?,
            state,
            optimizer: SafetensorsFile::open(&dir.join(OPTIMIZER_FILE))?,
        })
    }

    /// The name of the checkpoint's state file, for messages.
    pub fn state_file(&self) -> String {
        self.dir.join(STATE_FILE).display().to_string()
    }

    /// Fails, naming every difference, unless the checkpoint was written by a run with the
    /// identity `run` (see [`TrainerState::run`]).
    pub fn check_run(&self, run: &BTreeMap<String, String>) -> Result<()> {
        let saved = &self.state.run;
        let keys: std::collections::BTreeSet<&String> = saved.keys().chain(run.keys()).collect();
        let none = String::from("(not set)");
        let differences: Vec<String> = keys
            .into_iter()
            .filter_map(|key| {
                let (now, then) = (
                    run.get(key).unwrap_or(&none),
                    saved.get(key).unwrap_or(&none),
                );
                (now != then).then(|| format!("{key} is {now} now but was {then}"))
            })
            .collect();
        if differences.is_empty() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "{} was written by a different run: {}. Resume with the flags and data of that run, \
             or start a new run in another --out_dir",
            self.dir.display(),
            differences.join("; ")
        )))
    }

    /// AdamW's state as the checkpoint left it, for the parameters `specs`.
    pub fn optimizer(&self, specs: &[ParamSpec]) -> Result<AdamW> {
        let file = self.dir.join(OPTIMIZER_FILE).display().to_string();
        let mut moments = [Vec::new(), Vec::new()];
        for spec in specs {
            for (which, moment) in MOMENTS.iter().enumerate() {
                let name = format!("{}.{moment}", spec.name);
                let tensor = self.optimizer.read(&name)?;
                if tensor.dtype != DType::F32 || tensor.shape != spec.shape {
                    return Err(Error::tensor(
                        &file,
                        &name,
                        format!(
                            "{} {:?}, expected {} {:?} (the parameter's shape)",
                            tensor.dtype,
                            tensor.shape,
                            DType::F32,
                            spec.shape
                        ),
                    ));
                }
                moments[which].push(tensor.to_f32().expect("F32 converts"));
            }
        }
        let [first, second] = moments;
        let lengths: Vec<usize> = specs.iter().map(ParamSpec::elements).collect();
        AdamW::from_state(&lengths, self.state.optimizer_step, first, second)
            .ok_or_else(|| Error::format(&file, "the moments do not fit the parameters"))
    }
}

/// A digest of tokenized examples: count, tokens and a 64-bit FNV-1a hash of every id and label,
/// so that a resumed run notices different data (or a different tokenization of it).
pub fn examples_digest(examples: &[Example]) -> String {
    let mut hash = Fnv1a::default();
    let mut tokens = 0;
    for example in examples {
        hash.write(&(example.input_ids.len() as u64).to_le_bytes());
        example
            .input_ids
            .iter()
            .for_each(|id| hash.write(&id.to_le_bytes()));
        example
            .labels
            .iter()
            .for_each(|label| hash.write(&label.to_le_bytes()));
        tokens += example.input_ids.len();
    }
    format!(
        "{} examples of {tokens} tokens (FNV-1a {hash})",
        examples.len()
    )
}

struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl fmt::Display for Fnv1a {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn a_restored_generator_continues_the_stream_and_matches_std_rng() {
        let mut std_rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut rng = ChaCha12Rng::seed_from_u64(42);
        assert_eq!(std_rng.next_u64(), rng.next_u64());
        rng.next_u32();
        let state = RngState::of(&rng);
        let json = serde_json::to_string(&state).unwrap();
        let mut restored = serde_json::from_str::<RngState>(&json)
            .unwrap()
            .restore("s.json")
            .unwrap();
        let ahead: Vec<u64> = (0..40).map(|_| rng.next_u64()).collect();
        let again: Vec<u64> = (0..40).map(|_| restored.next_u64()).collect();
        assert_eq!(ahead, again);
        let bad = RngState {
            seed: "zz".repeat(32),
            ..state
        };
        assert!(bad.restore("s.json").is_err());
    }

    #[test]
    fn floats_go_through_json_exactly() {
        for x in [0.1f64, 1.0 / 3.0, 6.238_324_625_039_508, f64::MIN_POSITIVE] {
            let json = serde_json::to_string(&ExactF64(x)).unwrap();
            let back: ExactF64 = serde_json::from_str(&json).unwrap();
            assert_eq!(back.0.to_bits(), x.to_bits(), "{json}");
        }
    }

    #[test]
    fn only_whole_checkpoint_names_count_and_leftovers_are_cleaned() {
        assert_eq!(checkpoint_step("checkpoint-12"), Some(12));
        for name in [
            "checkpoint-12.tmp-7",
            "checkpoint-",
            "checkpoint-+1",
            "final",
        ] {
            assert_eq!(checkpoint_step(name), None, "{name}");
        }
        let out = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            fs::create_dir(out.path().join(name)).unwrap();
        };
        for name in [
            "checkpoint-2",
            "checkpoint-10",
            "checkpoint-12.tmp-99",
            "checkpoint-4.deleting-5",
            "best_model.old-99",
            "final",
            "final.old-98",
        ] {
            dir(name);
        }
        fs::write(out.path().join(".train_log.jsonl.tmp-abc"), "x").unwrap();
        assert_eq!(
            latest_checkpoint(out.path()).unwrap(),
            Some(out.path().join("checkpoint-10"))
        );
        recover_out_dir(out.path()).unwrap();
        let mut names: Vec<String> = fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["best_model", "checkpoint-10", "checkpoint-2", "final"]
        );
    }

    fn adapter() -> LoraAdapter {
        let lora = qlora_core::arch::LoraConfig {
            r: 1,
            alpha: 2.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: qlora_core::arch::TargetModules::Names(vec!["q".into()]),
        };
        let pair = qlora_core::peft::LoraPair {
            a: vec![0.5, -1.0],
            b: vec![0.25, 2.0, 3.0],
            r: 1,
            in_features: 2,
            out_features: 3,
        };
        LoraAdapter {
            config: qlora_core::peft::AdapterConfig::new(lora, None),
            modules: BTreeMap::from([("m.q".to_string(), pair)]),
            dtype: DType::F32,
        }
    }

    fn state(step: usize) -> TrainerState {
        let rng = RngState::of(&ChaCha12Rng::seed_from_u64(1));
        TrainerState {
            global_step: step,
            optimizer_step: step as u64,
            epoch: 0,
            steps_in_epoch: step,
            epoch_shuffle_rng: rng.clone(),
            dropout_rng: rng,
            best: Some(BestState {
                step: 1,
                val_loss: ExactF64(0.1),
            }),
            tokens: 7,
            first_loss: Some(ExactF64(1.0 / 3.0)),
            last_loss: None,
            log_lines: step,
            run: BTreeMap::from([("--lr".to_string(), "0.01".to_string())]),
        }
    }

    #[test]
    fn a_saved_checkpoint_loads_back_and_only_the_newest_are_kept() {
        let out = tempfile::tempdir().unwrap();
        let specs = [
            ParamSpec {
                name: "m.q.lora_A".into(),
                shape: vec![1, 2],
            },
            ParamSpec {
                name: "m.q.lora_B".into(),
                shape: vec![3, 1],
            },
        ];
        let params = crate::train::optimizer::AdamWParams::with_weight_decay(0.0);
        let mut optimizer = AdamW::new(&[2, 3]);
        let mut values = vec![vec![0.5, -1.0], vec![0.25, 2.0, 3.0]];
        let grads = [vec![0.1, 0.2], vec![0.3, -0.4, 0.5]];
        optimizer.step(params, &mut values, &grads, 0.01);
        for step in [1, 2, 3] {
            save_checkpoint(
                out.path(),
                &adapter(),
                &specs,
                &optimizer,
                &state(step),
                Some(2),
            )
            .unwrap();
        }
        let kept: Vec<usize> = checkpoints(out.path()).unwrap().into_keys().collect();
        assert_eq!(kept, [2, 3]);

        let dir = out.path().join("checkpoint-3");
        let checkpoint = Checkpoint::load(&dir).unwrap();
        assert_eq!(checkpoint.state, state(3));
        assert_eq!(checkpoint.adapter.modules, adapter().modules);
        let restored = checkpoint.optimizer(&specs).unwrap();
        assert_eq!(restored.steps(), 3, "the state's optimizer_step");
        assert_eq!(restored.first_moments(), optimizer.first_moments());
        assert_eq!(restored.second_moments(), optimizer.second_moments());
        let wrong_shape = [
            specs[0].clone(),
            ParamSpec {
                name: "m.q.lora_B".into(),
                shape: vec![1, 3],
            },
        ];
        let err = checkpoint
            .optimizer(&wrong_shape)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("tensor `m.q.lora_B.exp_avg`: float32 [3, 1], expected float32 [1, 3]"),
            "{err}"
        );

        let mut other = state(3);
        other.run.insert("--lr".into(), "0.5".into());
        let err = checkpoint.check_run(&other.run).unwrap_err().to_string();
        assert!(
            err.contains("was written by a different run: --lr is 0.5 now but was 0.01"),
            "{err}"
        );

        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"version\": 1", "\"version\": 2")).unwrap();
        let err = Checkpoint::load(&dir).err().unwrap().to_string();
        assert!(
            err.contains("version 2, this qlora reads `qlora-trainer-checkpoint` version 1"),
            "{err}"
        );
    }

    #[test]
    fn digests_tell_data_apart() {
        let example = |id| Example {
            input_ids: vec![1, id],
            labels: vec![-100, i64::from(id)],
            line: 1,
        };
        let a = examples_digest(&[example(5), example(6)]);
        assert!(a.starts_with("2 examples of 4 tokens (FNV-1a "), "{a}");
        assert_eq!(a, examples_digest(&[example(5), example(6)]));
        assert_ne!(a, examples_digest(&[example(6), example(5)]));
    }
}
