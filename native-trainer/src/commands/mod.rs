pub mod quantize;
pub mod score;
pub mod train;
