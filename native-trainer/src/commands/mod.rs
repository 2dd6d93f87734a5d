pub mod bench;
pub mod eval;
pub mod inspect;
pub mod merge;
pub mod predict;
pub mod quantize;
pub mod score;
pub mod train;
