//! CUDA C kernels and their Rust host side. Nothing here yet: the CUDA training issue fills it.
