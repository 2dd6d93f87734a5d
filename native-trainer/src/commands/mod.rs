pub mod quantize;
pub mod score;
