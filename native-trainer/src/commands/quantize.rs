//! `qlora quantize`: full-precision HF checkpoint in, 4-bit checkpoint out.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Directory of the full-precision HF checkpoint.
    #[arg(long)]
    pub model_name_or_path: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::bail!(
        "quantize is not written yet ({})",
        args.model_name_or_path.display()
    )
}
