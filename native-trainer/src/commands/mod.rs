pub mod eval;
pub mod predict;
pub mod quantize;
pub mod score;
