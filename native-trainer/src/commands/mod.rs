pub mod quantize;
pub mod score;
pub mod eval;
pub mod predict;
