pub mod inspect;
pub mod quantize;
pub mod score;
pub mod train;
